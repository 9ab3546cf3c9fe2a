"""The model runtime on a device: backbone runners (ONNX Runtime, LiteRT), the model spec a backbone carries,
and the device profiles that say which runner and format a class of device uses."""
