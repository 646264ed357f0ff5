"""Quarry on FPGA boards: bitstreams through the open flow and a UART host link.

* :mod:`boards.protocol` — the framed host protocol, defined once (gateware and host import it);
* :mod:`boards.uart`, :mod:`boards.soc` — 8N1 UART, the frame bridge, and ``QuarrySoC``
  (``hw.top.QuarryTop`` + weight/param ROM + UART + status LEDs);
* :mod:`boards.platforms`, :mod:`boards.icebreaker`, :mod:`boards.ulx3s` — the boards
  (amaranth-boards platforms, default accelerator per board, clock/PLL, pins);
* :mod:`boards.build` — ``python -m boards.build``: yosys + nextpnr (YoWASP) -> bitstream + report;
* :mod:`boards.link`, :mod:`boards.host` — host side: ``python -m boards.host`` over pyserial;
* :mod:`boards.simulate`, :mod:`boards.cocotb_soc` — the SoC under Verilator, driven over its
  UART pins by the same host code;
* :mod:`boards.tiny` — ``quarry_tiny``, a model small enough for the iCEBreaker.
"""
