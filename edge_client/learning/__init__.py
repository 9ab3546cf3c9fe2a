"""On-device learning, numpy only: the forecasting head with analytic gradients, the round's learner, and the
personalisation methods (adapters, self-distillation, gate, distortion consistency, rule guards)."""
