import numpy as np
import pandas as pd
import pyarrow as pa

from llmudf.calls.prompt import format_value
from llmudf.optimizer.encode import NULL, encode, group_fields


def test_codes_follow_rendered_text():
    table = pa.table({"f": [2.0, 1.0, None, 2.0], "s": ["b", "a", "b", None]})
    enc = encode(table)
    assert enc.codes.tolist() == [[1, 1], [0, 0], [NULL, 1], [1, NULL]]
    assert enc.texts[0].tolist() == ["1", "2"]
    assert enc.line_lengths(1).tolist() == [len("s: a\n"), len("s: b\n")]


def test_values_rendering_alike_share_a_code():
    # 1 and 1.0 render as "1"; a list column goes through the Python path
    df = pd.DataFrame({"x": pd.Series([1, 1.0, "1"], dtype=object), "l": [[1], [1], [2]]})
    enc = encode(df)
    assert enc.codes[:, 0].tolist() == [0, 0, 0]
    assert enc.codes[:, 1].tolist() == [0, 0, 1]
    assert enc.texts[1].tolist() == [format_value([1]), format_value([2])]


def test_one_to_one_columns_are_grouped():
    df = pd.DataFrame(
        {"id": [1, 2, 1, 3], "title": ["A", "B", "A", "C"], "year": [2000, 2000, 2000, 2001]}
    )
    groups = group_fields(encode(df))
    assert groups.members == ((0, 1), (2,))
    # a group's weight is the sum of its lines
    assert groups.weights[0].tolist() == [
        len("id: 1\ntitle: A\n"),
        len("id: 2\ntitle: B\n"),
        len("id: 3\ntitle: C\n"),
    ]
    assert np.array_equal(groups.codes[:, 0], [0, 1, 0, 2])
    assert group_fields(encode(df), detect_dependencies=False).members == ((0,), (1,), (2,))
