"""Small utilities shared by the tools: drawing detections, plotting metrics."""
