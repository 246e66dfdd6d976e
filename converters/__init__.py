"""Offline conversion: FP16, INT8 (static QDQ, dynamic), TensorRT, and the validation gate."""
