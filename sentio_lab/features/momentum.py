"""TA-Lib momentum producers: bounded or unitless oscillators (RSI, ADX, MFI, CMF, relative volume, stochastics,
MACD, ...), price differences divided by the close."""

from __future__ import annotations

import numpy as np
import talib

from sentio_lab.features.arrays import _lag, _safe_div, _window_sum
from sentio_lab.features.registry import Bars
from sentio_lab.features.talib_bank import _ema_settle, _osc_feature, _talib_feature, _tl

# --- momentum oscillators (bounded or unitless)
_osc_feature("RSI", (5, 14, 30), ("close",), settle=_ema_settle)
_osc_feature("CMO", (14,), ("close",), settle=_ema_settle)
_osc_feature("CMOU", (14, 30), ("close",))
_osc_feature("ROC", (14, 30), ("close",))
_osc_feature("TRIX", (5, 14), ("close",), settle=_ema_settle)
_osc_feature("ER", (10, 30), ("close",))
_osc_feature("FOSC", (14, 30), ("close",))
_osc_feature("VHF", (14, 28), ("close",))
_osc_feature("PERCENTRANK", (30, 60), ("close",))
_osc_feature("CCI", (14, 30), ("high", "low", "close"))
_osc_feature("WILLR", (14, 30), ("high", "low", "close"))
_osc_feature("ADX", (7, 14), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("ADXR", (14,), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("DX", (14,), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("PLUS_DI", (14,), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("MINUS_DI", (14,), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("PLUS_DM", (14,), ("high", "low"), settle=_ema_settle, per_close=True)
_osc_feature("MINUS_DM", (14,), ("high", "low"), settle=_ema_settle, per_close=True)
_osc_feature("NATR", (5, 14, 30), ("high", "low", "close"), settle=_ema_settle)


@_talib_feature("MFI", lookback=_tl("MFI", timeperiod=30))
def _mfi(b: Bars) -> dict[str, np.ndarray]:
    """Money flow index at 14 / 30 bars (0..100); 50 (neutral) where the window holds no money flow."""
    # TA-Lib's MFI: 100 * up-flow / (up-flow + down-flow), flow = typical price * volume, counted up (down) when
    # the typical price rose (fell). Exact window sums; where the window holds no flow at all (zero volume, or an
    # unchanged typical price) TA-Lib says 0, "all selling", which is wrong: no flow is neutral, 50.
    typical = (b.high + b.low + b.close) / 3.0
    flow = typical * b.volume
    change = np.diff(typical, prepend=np.nan)
    up, down = np.where(change > 0, flow, 0.0), np.where(change < 0, flow, 0.0)
    up[0] = down[0] = np.nan  # the first bar has no previous typical price
    out = {}
    for p in (14, 30):
        up_sum, down_sum = _window_sum(up, p), _window_sum(down, p)
        out[f"mfi_{p}"] = 100.0 * _safe_div(up_sum, up_sum + down_sum, undefined=0.5)
    return out

_osc_feature("IMI", (14,), ("open", "close"))
_osc_feature("AROONOSC", (30,), ("high", "low"))
_osc_feature("MOM", (5, 14), ("close",), per_close=True)
_osc_feature("QSTICK", (10,), ("open", "close"), per_close=True)
_osc_feature("DPO", (20,), ("close",), per_close=True)
_osc_feature("STDDEV", (5, 14), ("close",), per_close=True)
_osc_feature("AVGDEV", (14,), ("close",), per_close=True)
_osc_feature("ADR", (14,), ("high", "low"), per_close=True)


@_talib_feature("CMF", lookback=_tl("CMF", timeperiod=20))
def _cmf(b: Bars) -> dict[str, np.ndarray]:
    """Chaikin money flow over 20 bars (-1..1); 0 (no flow) where the window traded nothing."""
    # TA-Lib's CMF with exact window sums: sum(close location * volume) / sum(volume); a flat bar (high == low)
    # has close location 0.
    location = _safe_div(2.0 * b.close - b.high - b.low, b.high - b.low)
    return {"cmf_20": _safe_div(_window_sum(location * b.volume, 20), _window_sum(b.volume, 20))}


_RELVOL = 20


@_talib_feature("RVOL", lookback=_tl("RVOL", timeperiod=_RELVOL))
def _relvol(b: Bars) -> dict[str, np.ndarray]:
    """Relative volume: volume / mean volume of the previous 20 bars (20 or 1 after 20 bars without volume)."""
    # TA-Lib's RVOL with an exact window sum. Where the previous 20 bars traded nothing the ratio is undefined:
    # a bar that trades then gets 20, the ratio to the 20-bar mean that includes it (its largest possible
    # value), and a bar that does not trade gets 1 (it is like its window).
    previous = _lag(_window_sum(b.volume, _RELVOL), 1)
    traded_before = previous > 0
    ratio = _RELVOL * b.volume / np.where(traded_before, previous, 1.0)
    empty = np.where(b.volume > 0, float(_RELVOL), 1.0)
    return {f"relvol_{_RELVOL}": np.where(np.isnan(previous), np.nan, np.where(traded_before, ratio, empty))}



@_talib_feature("AROON", lookback=_tl("AROON", timeperiod=14))
def _aroon(b: Bars) -> dict[str, np.ndarray]:
    """Aroon down / up over 14 bars (bars since the low / high, 0..100)."""
    down, up = talib.AROON(b.high, b.low, timeperiod=14)
    return {"aroon_14_down": down, "aroon_14_up": up}


@_talib_feature("BOP", lookback=_tl("BOP"))
def _bop(b: Bars) -> dict[str, np.ndarray]:
    """Balance of power: (close - open) / (high - low)."""
    return {"bop": talib.BOP(b.open, b.high, b.low, b.close)}


@_talib_feature("APO", lookback=_tl("APO", fastperiod=5, slowperiod=14, matype=1), settle=_ema_settle(14))
def _apo(b: Bars) -> dict[str, np.ndarray]:
    """Absolute price oscillator (EMA 5 - EMA 14) divided by close."""
    return {"apo_5_14": talib.APO(b.close, fastperiod=5, slowperiod=14, matype=1) / b.close}


@_talib_feature("PPO", lookback=_tl("PPO", fastperiod=12, slowperiod=26, matype=1), settle=_ema_settle(26))
def _ppo(b: Bars) -> dict[str, np.ndarray]:
    """Percentage price oscillator (EMA 12 vs EMA 26)."""
    return {"ppo_12_26": talib.PPO(b.close, fastperiod=12, slowperiod=26, matype=1)}


def _macd_dict(prefix: str, triple: tuple[np.ndarray, np.ndarray, np.ndarray], close: np.ndarray) -> dict:
    """MACD line, signal and histogram divided by close."""
    return {f"{prefix}_{k}": v / close for k, v in zip(("line", "signal", "hist"), triple, strict=True)}


@_talib_feature(
    "MACD", lookback=_tl("MACD", fastperiod=6, slowperiod=13, signalperiod=5), settle=_ema_settle(13)
)
def _macd(b: Bars) -> dict[str, np.ndarray]:
    """Fast MACD (EMA 6 / 13, signal 5) divided by close."""
    return _macd_dict("macd_6_13", talib.MACD(b.close, fastperiod=6, slowperiod=13, signalperiod=5), b.close)


@_talib_feature("MACDFIX", lookback=_tl("MACDFIX", signalperiod=9), settle=_ema_settle(26))
def _macdfix(b: Bars) -> dict[str, np.ndarray]:
    """Classic MACD (12 / 26, signal 9) divided by close."""
    return _macd_dict("macd_12_26", talib.MACDFIX(b.close, signalperiod=9), b.close)


@_talib_feature("MACDEXT", lookback=_tl("MACDEXT", fastperiod=12, slowperiod=26, signalperiod=9))
def _macdext(b: Bars) -> dict[str, np.ndarray]:
    """MACD built from simple moving averages (12 / 26, signal 9) divided by close."""
    triple = talib.MACDEXT(
        b.close, fastperiod=12, fastmatype=0, slowperiod=26, slowmatype=0, signalperiod=9, signalmatype=0
    )
    return _macd_dict("macdext_sma_12_26", triple, b.close)


@_talib_feature("STOCH", lookback=_tl("STOCH", fastk_period=30, slowk_period=5, slowd_period=5))
def _stoch(b: Bars) -> dict[str, np.ndarray]:
    """Slow stochastic %K / %D at (5, 3, 3) and (30, 5, 5)."""
    out = {}
    for fk, sk in ((5, 3), (30, 5)):
        k, d = talib.STOCH(b.high, b.low, b.close, fastk_period=fk, slowk_period=sk, slowd_period=sk)
        out[f"stoch_{fk}_k"], out[f"stoch_{fk}_d"] = k, d
    return out


@_talib_feature("STOCHF", lookback=_tl("STOCHF", fastk_period=14, fastd_period=3))
def _stochf(b: Bars) -> dict[str, np.ndarray]:
    """Fast stochastic %K / %D at (14, 3)."""
    k, d = talib.STOCHF(b.high, b.low, b.close, fastk_period=14, fastd_period=3)
    return {"stochf_14_k": k, "stochf_14_d": d}


@_talib_feature(
    "STOCHRSI",
    lookback=_tl("STOCHRSI", timeperiod=14, fastk_period=5, fastd_period=3),
    settle=_ema_settle(14),
)
def _stochrsi(b: Bars) -> dict[str, np.ndarray]:
    """Stochastic of RSI(14): fast %K (5) and %D (3)."""
    k, d = talib.STOCHRSI(b.close, timeperiod=14, fastk_period=5, fastd_period=3)
    return {"stochrsi_14_k": k, "stochrsi_14_d": d}


@_talib_feature("KDJ", lookback=_tl("KDJ"), settle=_ema_settle(3))
def _kdj(b: Bars) -> dict[str, np.ndarray]:
    """KDJ stochastic (9, 3, 3): K, D and J."""
    k, d, j = talib.KDJ(b.high, b.low, b.close)
    return {"kdj_k": k, "kdj_d": d, "kdj_j": j}


@_talib_feature("SMI", lookback=_tl("SMI"), settle=_ema_settle(25))
def _smi(b: Bars) -> dict[str, np.ndarray]:
    """Stochastic momentum index (13, 2, 25, 9) and its signal."""
    smi, signal = talib.SMI(b.high, b.low, b.close)
    return {"smi": smi, "smi_signal": signal}


@_talib_feature("TSI", lookback=_tl("TSI", firstperiod=25, secondperiod=13), settle=_ema_settle(25))
def _tsi(b: Bars) -> dict[str, np.ndarray]:
    """True strength index (25, 13)."""
    return {"tsi_25_13": talib.TSI(b.close, firstperiod=25, secondperiod=13)}


@_talib_feature("ULTOSC", lookback=_tl("ULTOSC", timeperiod1=7, timeperiod2=14, timeperiod3=28))
def _ultosc(b: Bars) -> dict[str, np.ndarray]:
    """Ultimate oscillator (7, 14, 28)."""
    return {"ultosc": talib.ULTOSC(b.high, b.low, b.close, timeperiod1=7, timeperiod2=14, timeperiod3=28)}


@_talib_feature("COPPOCK", lookback=_tl("COPPOCK"))
def _coppock(b: Bars) -> dict[str, np.ndarray]:
    """Coppock curve (WMA 10 of ROC 11 + ROC 14)."""
    return {"coppock": talib.COPPOCK(b.close)}


@_talib_feature("VORTEX", lookback=_tl("VORTEX", timeperiod=14))
def _vortex(b: Bars) -> dict[str, np.ndarray]:
    """Vortex indicator (14): +VI and -VI."""
    plus, minus = talib.VORTEX(b.high, b.low, b.close, timeperiod=14)
    return {"vortex_plus": plus, "vortex_minus": minus}


@_talib_feature("AC", lookback=_tl("AC"))
def _ac(b: Bars) -> dict[str, np.ndarray]:
    """Accelerator oscillator (5, 34, 5) divided by close."""
    return {"ac": talib.AC(b.high, b.low) / b.close}


@_talib_feature("AO", lookback=_tl("AO"))
def _ao(b: Bars) -> dict[str, np.ndarray]:
    """Awesome oscillator (5, 34) divided by close."""
    return {"ao": talib.AO(b.high, b.low) / b.close}


@_talib_feature("ERI", lookback=_tl("ERI", timeperiod=13), settle=_ema_settle(13))
def _eri(b: Bars) -> dict[str, np.ndarray]:
    """Elder ray (13): bull and bear power divided by close."""
    bull, bear = talib.ERI(b.high, b.low, b.close, timeperiod=13)
    return {"eri_bull": bull / b.close, "eri_bear": bear / b.close}


@_talib_feature("FRACTAL", lookback=_tl("FRACTAL"))
def _fractal(b: Bars) -> dict[str, np.ndarray]:
    """Williams fractal flags (2 / 2 bars), reported when the right-hand bars have closed."""
    high, low = talib.FRACTAL(b.high, b.low)
    return {"fractal_high": high.astype(np.float64), "fractal_low": low.astype(np.float64)}
