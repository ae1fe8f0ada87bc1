"""Vista-Bench: local, wavelet-domain degradations of real photos, with boxes, types, severities and MOS.

``texture`` finds where a photo has detail, ``regions`` places defect boxes there, ``degradations``
injects them, ``mos`` scores the result, and ``synthesize`` runs it all as ``qprobe bench`` (its
parameters in ``config``, what it writes besides the images and which files it owns in ``outputs``).
"""
