"""Step metrics: accumulated on device and reduced across ranks only when logged (`meter`), written to one
small sink per backend (`sinks`: console, metrics.jsonl, TensorBoard, W&B), and plotted (`plot`)."""
