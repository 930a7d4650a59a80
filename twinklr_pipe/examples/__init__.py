"""Runnable examples of ``twinklr_pipe`` pipelines.

* :mod:`twinklr_pipe.examples.sequencer` -- the Twinklr sequencer: a WAV file in, an
  xLights sequence out, through audio analysis, LLM planners and a FAN_OUT over display
  groups. Runs offline: ``pipe run twinklr_pipe.examples.sequencer:pipeline``.
"""
