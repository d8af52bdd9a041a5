"""The track stage's algorithm (stages/track.py is the stage): one source's steps frame after
frame (source.py), the tracker (tracker.py, ByteTrack in numpy: bytetrack.py, lsap.py), finding
a track by its look between detections (templates.py), evidence over frames (evidence.py), one
box per caption and "not in view" (assign.py, grounding.py, with the scorer's calibration:
calibration.py)."""
