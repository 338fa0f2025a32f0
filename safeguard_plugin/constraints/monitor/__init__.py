"""Live safety monitor: measure the model's safety signals during training and act when they degrade.

No loss term. Every ``every_n_steps`` optimizer steps (and at the last step) the monitor measures, with
the model in eval mode under ``no_grad`` (the engine's penalty hooks are inactive then):

* **cosine**: per selected layer l, cos(mean_harmful h[l] - mean_harmless h[l], r[l]) at the artifact's
  selected post-instruction position, on the held-out monitor prompts; ``monitor_cosine`` is the mean
  over the artifact's selected layers. Alert when it falls below ``min_cosine``.
* **refusal score**: mean generation-free refusal log-odds (:func:`safeguard_plugin.eval.refusal_scores`)
  on the harmful prompts. Alert when it drops by more than ``max_score_drop`` from train begin.
* **projection shift**: mean (prompts, selected layers) projection of the harmful activations on r, in
  calibration std units, minus its train-begin value. Alert when ``|shift| > max_projection_shift``.

Cost per check: one forward over ``2 × n_prompts`` prompts that stops after the last selected layer, plus
one full forward over ``n_prompts`` prompts for the refusal score.

On an alert: ``warn`` warns (``warnings.warn`` + log); ``stop`` also asks the run to stop
(``Runtime.request_stop``), so the integration ends training; ``restore`` first copies the last safe trainable
weights (a CPU snapshot taken at train begin and refreshed after every passing check) back into the model, then
stops.
"""


from .config import SafetyMonitorConfig
from .constraint import Measurement, SafetyMonitor

__all__ = ["Measurement", "SafetyMonitor", "SafetyMonitorConfig"]
