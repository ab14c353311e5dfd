import numpy as np
import pytest


def test_prepared_market_ranges_and_arrays(sp500_market):
    m = sp500_market
    assert [m.range(name) for name in ("train", "validation", "test")] == [
        (0, m.splits["train"].stop), (m.splits["train"].stop, m.splits["validation"].stop),
        (m.splits["validation"].stop, len(m.data)),
    ]
    assert m.arrays.features.dtype == np.float32 and m.arrays.features.shape[0] == len(m.data)
    assert np.isfinite(m.arrays.features[m.features.first_valid :]).all()
    np.testing.assert_array_equal(m.arrays.close, m.data.frame["close"].to_numpy())
    with pytest.raises(KeyError, match="unknown range"):
        m.range("holdout")
