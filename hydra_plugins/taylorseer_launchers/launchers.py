"""The project's sweep launchers: hydra-submitit-launcher's, with each job's resources from its own run.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace, so the classes live here; what they add
is :class:`taylorseer.harness.slurm_launcher.PerJobResources` (K ranks for ``parallel.ulysses x parallel.ring =
K``, one GPU per rank, one job array per set of resources, refused before submission when a job's resources
cannot host its run). ``configs/hydra/launcher/{slurm,local}.yaml`` name them.
"""

try:  # the optional `slurm` extra: without it Hydra's plugin scan must not fail at every start
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _submitit
except ImportError:
    _submitit = None

from taylorseer.harness.slurm_launcher import PerJobResources

if _submitit is not None:

    class SlurmLauncher(PerJobResources, _submitit.SlurmLauncher):
        """``hydra/launcher=slurm``: a sweep as Slurm job arrays, each job sized for its run."""

    class LocalLauncher(PerJobResources, _submitit.LocalLauncher):
        """``hydra/launcher=local``: the same through submitit's local executor, on this machine."""
