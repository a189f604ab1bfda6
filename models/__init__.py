"""clipstream's model abstraction layer: adapters over scikit-learn and ONNX models, safe
model files, the replica runtime (a consumer-group member), and the control plane."""
