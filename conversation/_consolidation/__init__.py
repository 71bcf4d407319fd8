"""Consolidation (SPEC §21): fold a room's oldest turns into a rolling summary.

``config`` (the settings), ``records`` (what it hands back), ``plan`` (which
turns a fold takes), ``archive`` (the archive's layout), ``consolidator`` (the
fold itself, reached by the manager), ``worker`` (``ConsolidationWorker``) and
``summarizer`` (the offline default).
"""
