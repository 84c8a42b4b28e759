"""Face detection (MTCNN) for sources that carry no landmarks."""
