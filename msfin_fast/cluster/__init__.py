"""Scale-out on Ray: folder jobs on Ray Data (:mod:`.jobs`), a replicated service on Ray Serve
(:mod:`.service`), and what both share (:mod:`.common`: importing Ray, connecting, workers'
environment, option checks).

Needs the ``scale`` extra (``pip install 'msfin_fast[scale]'``); nothing here imports Ray until it
is used. Workers and replicas read the weights where the driver would: the driver's ``MSFIN_*`` and
``TORCH_HOME`` environment variables are passed to them.
"""

from .common import check_reachable, ray_session
from .jobs import JobOptions, JobSummary, UpscaleWorker, plan_job, run_job
from .service import MSFINReplica, ServiceOptions, build_app, run_service, service

__all__ = ["JobOptions", "JobSummary", "UpscaleWorker", "plan_job", "run_job", "ray_session", "check_reachable",
           "ServiceOptions", "MSFINReplica", "service", "build_app", "run_service"]
