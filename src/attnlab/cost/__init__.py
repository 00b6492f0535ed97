"""Kinetics-style cost model (B77): FLOPs, memory traffic and effective FLOPs of every attention method, checked
against measured times (:mod:`.check`) and used to put test-time compute on one cost axis (:mod:`.tts`)."""

from .methods import MethodSpec, ModelShape, Priced, parse_method, price
from .model import Cost, Hardware, Heads, NotPriced, measure_bandwidth, op_cost, op_decode_cost

__all__ = ["Cost", "Hardware", "Heads", "MethodSpec", "ModelShape", "NotPriced", "Priced", "measure_bandwidth",
           "op_cost", "op_decode_cost", "parse_method", "price"]
