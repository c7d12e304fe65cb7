"""shared.sd_model, opts, cmd_opts and state, as the WebUI has them."""
from types import SimpleNamespace


class State:
    """shared.state: what /internal/progress reads; begin/end around a job."""

    def __init__(self):
        self.job = ""
        self.job_count = self.job_no = self.sampling_step = self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = False
        self.begun = self.ended = 0

    def begin(self, job="(unknown)"):
        self.job, self.interrupted = job, False
        self.begun += 1

    def end(self):
        self.job = ""
        self.ended += 1


sd_model = None
opts = SimpleNamespace(CLIP_stop_at_last_layers=1, sd_model_checkpoint="")
cmd_opts = SimpleNamespace(lora_dir=None, api_auth=None)
state = State()
