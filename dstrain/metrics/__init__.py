"""Step metrics: accumulated on device and reduced across ranks only when logged (`meter`), memory and MFU
against the card's peak (`device`), written to one small sink per backend (`sinks`: console, metrics.jsonl,
TensorBoard, W&B), and plotted (`plot`)."""
