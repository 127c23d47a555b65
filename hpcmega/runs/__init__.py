"""Reading and describing run folders (`ls`, `status`, `logs`, `cancel`, `resume`): pure Python at import time.

``files`` owns every file name inside a run folder; the job, the launcher, training and the W&B logger write
through it, the lifecycle commands read through it.
"""
