"""Multi-object tracking: MOTChallenge I/O, generated sequences, association, metrics, rendering and TransTrack.

- ``mot``: the MOT text format (:func:`read_mot`, :func:`write_mot`) and sequences (:func:`load_sequence`,
  :func:`list_sequences`: a MOTChallenge folder ``SEQ/img1/000001.jpg`` or a video with its gt beside it).
- ``synth``: procedural sequences in the MOTChallenge layout (:func:`write_sequences`) for the demo and tests.
- ``associate``: box IoU / GIoU and the :class:`Tracker` (Hungarian association of detections with tracks,
  against predicted track boxes or each track's last box).
- ``metrics``: MOTA, IDF1, HOTA, ... through TrackEval (:func:`evaluate`, :func:`evaluate_files`).
- ``render``: boxes and ids drawn on a sequence's frames, written as mp4 (:func:`render_tracks`).
- ``model`` (TransTrack on a pyramid backbone), ``matcher`` (Hungarian matcher and set loss), ``data``
  (training pairs, the ``mot_pairs`` dataset), ``objective`` (``transtrack``), ``infer`` (tracking a sequence
  with a trained model).

Importing the package itself imports none of them (``vitssl.video`` imports ``data`` and ``objective`` to
register them); TrackEval is imported only when metrics are computed.
"""
