"""Faster R-CNN + FPN on COCO-format data."""
