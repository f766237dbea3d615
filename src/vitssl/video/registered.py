"""Importing this module registers every video dataset and objective (``import vitssl.video.registered``)."""

from vitssl.video import register

register()
