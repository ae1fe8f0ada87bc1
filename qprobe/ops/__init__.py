"""Operations code: local services (``qprobe services``; ``roles``: what each one runs) and cluster
launchers (``qprobe launch``; ``manifests``: the Job and task it submits).

Not the ML library: nothing else under ``qprobe/`` imports this package (a test holds it so). It
starts processes, reads ``/proc``, renders cluster manifests and edits ``dvc.lock``; the stages it
runs are the library's.
"""
