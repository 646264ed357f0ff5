"""Accelerator configuration: the one place where array shape, widths and depths are defined.

Everything else (ISA layouts, RTL, golden model, compiler) derives its widths from an
:class:`AccelConfig`. Variants are made with :func:`dataclasses.replace` on a validated default,
Gemmini-style; ``__post_init__`` checks every field and names the field in its message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass

__all__ = ["AccelConfig", "ConfigError", "PE_KINDS", "POT_EXP_CAP"]

#: PE kinds. ``int``: signed integer multiply. ``pot``: power-of-two weights (shift, no multiplier).
#: ``hybrid``: both, selected per MATMUL (its ``pot`` field). The PoT weight format is defined in
#: :mod:`hw.isa` (``pot_code_layout``, ``pot_encode``, ``pot_decode``).
PE_KINDS = ("int", "pot", "hybrid")

#: Largest PoT weight exponent at any ``w_bits``. A ``w_bits`` code has ``2**(w_bits-1) - 1``
#: non-zero magnitudes, i.e. exponents up to ``2**(w_bits-1) - 2`` (126 at 8 bits). 16 octaves
#: (2**0 .. 2**15) is already more dynamic range than PoT quantizers use (INQ spans 8 octaves at
#: 5 bits), and capping there keeps a W8A8 PoT accumulator at the default wmem depth at 36 bits,
#: the same ``acc_width + mult_bits <= 60`` budget as W8A8 int. Codes beyond the cap are illegal.
POT_EXP_CAP = 15

_MAX_DIM = 32
_MIN_BITS, _MAX_BITS = 2, 8
_MAX_DEPTH = 1 << 20


class ConfigError(ValueError):
    """An :class:`AccelConfig` field (or a string to parse into one) is invalid.

    ``field`` names the offending field.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _clog2(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


#: Fields added after the first release, with the default that means "as before".
_LATER_FIELDS = {"block_scale": False, "packed_weights": False, "post_overlap": True, "bfp_exp_bits": 0}

#: Largest ``bfp_exp_bits``: a shared exponent of 0..7 (DSConv's activation blocks need a few
#: octaves; every extra bit widens the block-rescale left shift).
_MAX_BFP_EXP_BITS = 3


@dataclass(frozen=True)
class AccelConfig:
    """Parameters of one generated accelerator.

    The systolic array is ``rows`` x ``cols``: ``rows`` is the reduction dimension (one input
    channel per row), ``cols`` the output-channel dimension. Activation scratchpad rows hold
    ``rows`` activations; accumulator and weight-memory rows hold ``cols`` lanes.
    """

    rows: int = 16
    cols: int = 16
    w_bits: int = 8
    a_bits: int = 8
    pe_kind: str = "int"
    #: Activation scratchpad depth, in rows of ``rows`` activations.
    spad_depth: int = 4096
    #: Accumulator memory depth, in rows of ``cols`` accumulators.
    acc_depth: int = 1024
    #: Weight memory depth, in rows of ``cols`` weights (one row per reduction index).
    wmem_depth: int = 4096
    #: Instruction memory depth, in instructions.
    imem_depth: int = 1024
    #: Requantization parameter memory depth, in rows of ``cols`` channel parameters.
    param_depth: int = 64
    #: Accumulator width override; ``None`` derives it (see :attr:`acc_width`).
    acc_bits: int | None = None
    #: Width of the unsigned fixed-point requantization multiplier M0.
    mult_bits: int = 24
    #: Width of the requantization right shift.
    shift_bits: int = 6
    #: Width of the average-pooling multiplier immediate.
    pool_mult_bits: int = 16
    #: Width of tensor height/width fields in instructions (max dimension 2**dim_bits - 1).
    dim_bits: int = 10
    #: Block rescaling in the accumulator path (DSConv): every MATMUL's sums are multiplied by
    #: the per-lane ``mult`` and rounding-shifted by ``shift`` of param row ``scale_addr`` before
    #: they are accumulated (2 more pipeline stages, ``cols`` multipliers).
    block_scale: bool = False
    #: Packed weight storage: PRELOAD's ``pack_bits`` field (``hw.isa``) lets one wmem row hold
    #: ``w_bits // k`` array rows of ``k``-bit INT weights, sign-extended by the loader on their
    #: way to the array (a field selector per column; PRELOAD timing is unchanged).
    packed_weights: bool = False
    #: MATMUL/POST overlap: POST gets its own accumulator read port (the accumulator memory is
    #: duplicated) and MATMUL an ``overlap`` bit, so the next output block's MATMULs can stream
    #: while POST requantizes the previous one (``hw.timing`` for the rules). Off: MATMUL always
    #: waits for POST, one accumulator read port.
    post_overlap: bool = True
    #: Block-floating-point activations (DSConv): width of the unsigned shared exponent stored
    #: per spad row in the ``spad_exp`` memory (0: off, no memory). POST with ``bfp = 1`` writes
    #: mantissas and their row's exponent; MATMUL's block rescale shifts by ``shift - exponent``
    #: (``sim/golden.py``). Needs ``block_scale``.
    bfp_exp_bits: int = 0

    def __post_init__(self):
        def check_int(name, lo, hi):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(name, f"{name} must be an integer in {lo}..{hi}, not {v!r}")

        check_int("rows", 1, _MAX_DIM)
        check_int("cols", 1, _MAX_DIM)
        check_int("w_bits", _MIN_BITS, _MAX_BITS)
        check_int("a_bits", _MIN_BITS, _MAX_BITS)
        for name in ("block_scale", "packed_weights", "post_overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.pe_kind not in PE_KINDS:
            raise ConfigError("pe_kind", f"pe_kind must be one of {', '.join(PE_KINDS)}, not {self.pe_kind!r}")
        for name in ("spad_depth", "acc_depth", "wmem_depth", "imem_depth", "param_depth"):
            check_int(name, 2, _MAX_DEPTH)
        check_int("mult_bits", 8, 32)
        check_int("shift_bits", 4, 6)
        check_int("pool_mult_bits", 4, 16)
        check_int("dim_bits", 4, 12)
        check_int("bfp_exp_bits", 0, _MAX_BFP_EXP_BITS)
        if self.bfp_exp_bits and not self.block_scale:
            raise ConfigError("bfp_exp_bits", f"bfp_exp_bits = {self.bfp_exp_bits} needs block_scale "
                                              "(the block rescale absorbs the exponents)")
        lo = self.product_bits + 1
        if self.acc_bits is not None:
            check_int("acc_bits", lo, 48)
        if self.acc_width + self.mult_bits > 60:
            # The post-processing product (acc + bias) * M0 + residual must fit in 63 bits so the
            # golden model stays in int64 and the RTL datapath stays bounded.
            raise ConfigError(
                "mult_bits",
                f"acc width ({self.acc_width}) + mult_bits ({self.mult_bits}) must be <= 60",
            )

    # -- derived widths -------------------------------------------------------------------------

    @property
    def pot_max_exp(self) -> int:
        """Largest exponent of a PoT weight: ``min(2**(w_bits-1) - 2, POT_EXP_CAP)``.

        Defined for every ``pe_kind`` (it is a property of the ``w_bits`` number format); only
        ``pot`` and ``hybrid`` PEs use it.
        """
        return min((1 << (self.w_bits - 1)) - 2, POT_EXP_CAP)

    @property
    def product_bits(self) -> int:
        """Signed width of the largest weight x activation product the PEs can form.

        Activations are ``a_bits`` signed or unsigned, so ``|a| <= 2**a_bits - 1``. An int weight
        (``|w| <= 2**(w_bits-1)``) gives ``w_bits + a_bits`` bits; a PoT weight
        (``|w| <= 2**pot_max_exp``) gives ``a_bits + 1 + pot_max_exp``. ``hybrid`` does both.
        """
        int_bits = self.w_bits + self.a_bits
        pot_bits = self.a_bits + 1 + self.pot_max_exp
        return {"int": int_bits, "pot": pot_bits}.get(self.pe_kind, max(int_bits, pot_bits))

    @property
    def acc_width(self) -> int:
        """Accumulator width.

        One product needs :attr:`product_bits`; the largest reduction the weight memory can hold
        is ``wmem_depth`` terms (one weight row per reduction index), adding ``ceil(log2)`` bits,
        so no sum of a legal program overflows (a PoT W8A8 config at the default depth: 36 bits).
        On a ``bfp_exp_bits`` config a block-floating-point activation is its mantissa shifted
        left by up to :attr:`bfp_emax`, so the accumulated (rescaled) sums need ``bfp_emax`` more.
        """
        if self.acc_bits is not None:
            return self.acc_bits
        return self.product_bits + _clog2(self.wmem_depth) + self.bfp_emax

    @property
    def act_ext_bits(self) -> int:
        """Width of an activation once sign- or zero-extended for the PE (``a_bits + 1``)."""
        return self.a_bits + 1

    @property
    def bias_bits(self) -> int:
        return self.acc_width

    @property
    def spad_addr_bits(self) -> int:
        return _clog2(self.spad_depth)

    @property
    def acc_addr_bits(self) -> int:
        return _clog2(self.acc_depth)

    @property
    def wmem_addr_bits(self) -> int:
        return _clog2(self.wmem_depth)

    @property
    def imem_addr_bits(self) -> int:
        return _clog2(self.imem_depth)

    @property
    def param_addr_bits(self) -> int:
        return _clog2(self.param_depth)

    @property
    def lane_bits(self) -> int:
        """Width of a lane index/count field (counts up to ``max(rows, cols)`` inclusive)."""
        return _clog2(max(self.rows, self.cols) + 1)

    @property
    def row_count_bits(self) -> int:
        """Width of a weight-row count (1..rows)."""
        return _clog2(self.rows + 1)

    @property
    def spad_row_bits(self) -> int:
        return self.rows * self.a_bits

    @property
    def acc_row_bits(self) -> int:
        return self.cols * self.acc_width

    @property
    def wmem_row_bits(self) -> int:
        return self.cols * self.w_bits

    @property
    def param_lane_bits(self) -> int:
        """Bits of one channel's requantization parameters (bias, mult, res_mult, shift)."""
        return self.bias_bits + 2 * self.mult_bits + self.shift_bits

    @property
    def param_row_bits(self) -> int:
        return self.cols * self.param_lane_bits

    @property
    def bfp_emax(self) -> int:
        """Largest block-floating-point exponent, ``2**bfp_exp_bits - 1`` (0 when BFP is off)."""
        return (1 << self.bfp_exp_bits) - 1

    @property
    def pe_count(self) -> int:
        return self.rows * self.cols

    def memory_bits(self) -> dict[str, int]:
        """Size of each on-chip memory in bits."""
        from . import isa  # local import: isa depends on config

        out = {
            "spad": self.spad_depth * self.spad_row_bits,
            "acc": self.acc_depth * self.acc_row_bits,
            "wmem": self.wmem_depth * self.wmem_row_bits,
            "imem": self.imem_depth * isa.instr_bits(self),
            "param": self.param_depth * self.param_row_bits,
        }
        if self.bfp_exp_bits:
            out["spad_exp"] = self.spad_depth * self.bfp_exp_bits
        return out

    # -- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Every field, except fields added after 0.1 while they hold their default (which keeps
        the behaviour, and so the :attr:`hash`, of configs written before them)."""
        d = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "AccelConfig":
        if not isinstance(d, dict):
            raise ConfigError("config", f"config must be a JSON object, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(unknown[0], f"unknown config field {unknown[0]!r}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "AccelConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("config", f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit hash of every field; programs carry it to refuse a foreign config."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @staticmethod
    def parse_pe(text: str) -> tuple[int, int]:
        """Parse ``"RxC"`` (e.g. ``"16x16"``, ``"8x4"``) into ``(rows, cols)``."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
        if not m:
            raise ConfigError("pe", f"pe must look like ROWSxCOLS (e.g. 16x16), not {text!r}")
        r, c = int(m.group(1)), int(m.group(2))
        for name, v in (("rows", r), ("cols", c)):
            if not 1 <= v <= _MAX_DIM:
                raise ConfigError(name, f"{name} must be an integer in 1..{_MAX_DIM}, not {v!r} (from pe {text!r})")
        return r, c

    def describe(self) -> str:
        return (f"{self.rows}x{self.cols} {self.pe_kind} W{self.w_bits}A{self.a_bits} "
                f"acc{self.acc_width} spad{self.spad_depth} accmem{self.acc_depth} "
                f"wmem{self.wmem_depth} imem{self.imem_depth}" + (" blockscale" if self.block_scale else "")
                + (f" bfp{self.bfp_exp_bits}" if self.bfp_exp_bits else "")
                + (" packed" if self.packed_weights else "") + ("" if self.post_overlap else " no-overlap"))
