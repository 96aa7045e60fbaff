"""gpubridge: run ComfyUI workflows on GPU backends through one provider-agnostic runner.

    import gpubridge

    async with gpubridge.connect("local") as runner:
        result = await runner.run("workflow.json", timeout=120)
        result.save("out/")

    with gpubridge.connect().sync() as runner:          # blocking facade over the same runner
        result = runner.run(gpubridge.Workflow.load("workflow.json").set("KSampler.seed", 42))
"""

from .config import Settings
from .connect import connect
from .errors import (
    AuthError,
    ConfigError,
    GpuBridgeError,
    JobCancelled,
    JobError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProtocolError,
    ProviderError,
    ProviderNotFound,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
    WorkflowError,
    WorkflowFormatError,
    WorkflowInputError,
    WorkflowInvalid,
)
from .models import (
    Artifact,
    ArtifactKind,
    EventType,
    HealthReport,
    HealthState,
    InputFile,
    JobEvent,
    JobHandle,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    Progress,
    Workflow,
)
from .runner import RunnerWrapper, SyncRunner, WorkflowRunner
from .templates import TemplateRegistry  # also lets JobRequest(template=...) render (see gpubridge.models)

__version__ = "0.1.0"

__all__ = [
    "connect",
    "Settings",
    "WorkflowRunner",
    "RunnerWrapper",
    "SyncRunner",
    "Workflow",
    "InputFile",
    "JobRequest",
    "TemplateRegistry",
    "JobHandle",
    "JobState",
    "JobStatus",
    "JobEvent",
    "EventType",
    "Progress",
    "JobResult",
    "Artifact",
    "ArtifactKind",
    "HealthReport",
    "HealthState",
    "GpuBridgeError",
    "ConfigError",
    "ProviderNotFound",
    "WorkflowError",
    "WorkflowFormatError",
    "WorkflowInputError",
    "WorkflowInvalid",
    "PayloadTooLarge",
    "AuthError",
    "ProviderError",
    "ProviderUnavailable",
    "RateLimited",
    "ProtocolError",
    "JobError",
    "JobFailed",
    "JobTimeout",
    "JobCancelled",
    "JobNotFound",
    "ResultExpired",
]
