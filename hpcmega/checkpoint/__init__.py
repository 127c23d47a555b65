"""Checkpoints, in one home that the commands and the ranks both import:

  store.py    DCP save/load through fsspec, the commit marker and manifest, listing and verification (torch only
              inside the save/load paths, so listing stays cheap for `ls`/`status`)
  rules.py    what a run may load: the model must match, foreign checkpoints must be trusted (pure Python)
  locate.py   which checkpoint a user means (a step folder, a checkpoint folder or a run folder)
"""
