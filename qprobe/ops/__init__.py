"""Operations code: local services (``qprobe services``) and cluster launchers (``qprobe launch``).

Not the ML library: nothing else under ``qprobe/`` imports this package (a test holds it so). It
starts processes, reads ``/proc``, renders cluster manifests and edits ``dvc.lock``; the stages it
runs are the library's.
"""
