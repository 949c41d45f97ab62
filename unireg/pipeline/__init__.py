"""Registering scans: the stages around the network, one module each.

    inputs (load + check) → grids (working / refinement grids over the fixed FOV)
      → align (moments → rigid → affine) → network (prompted field at the working grid)
      → refine (multi-resolution instance optimisation from the network's velocity; points: the
        random voxels a large level is read at)
      → mapping (total affine ∘ deformable mapping on the fixed grid, mm) → RegistrationResult

:class:`~unireg.pipeline.register.RegistrationPipeline` composes them, as segment-anything's
``SamPredictor(sam)`` wraps ``Sam``: the network itself stays tensors in, field out.
"""
