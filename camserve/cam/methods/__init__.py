"""The CAM methods, by family: ``gradient``, ``activation``, ``perturbation`` and ``composite``, and the one
``registry`` of their records (:data:`camserve.cam.methods.registry.METHODS`)."""
