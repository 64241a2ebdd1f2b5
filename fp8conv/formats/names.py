"""The names of the built-in number formats, in one place: what `--format` and scheme specs accept and what
reports, manifests and cards carry. Each codec module binds its class to one of these (`name=`), and the
microscaled formats' table is keyed by them; the rest of fp8conv reaches a format through the registries
(FORMATS, MICROSCALE), never by spelling its name."""
from __future__ import annotations

FP8_E4M3 = "fp8_e4m3"
FP8_E5M2 = "fp8_e5m2"
INT8 = "int8"
INT4 = "int4"
FP4_E2M1 = "fp4_e2m1"
NVFP4 = "nvfp4"
MXFP4 = "mxfp4"
MXFP8 = "mxfp8"
