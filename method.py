"""What a method is: the one interface through which train.py runs every fine-tuning method.

A method is a class with a name in the method table (catalog.py: METHODS). train.py makes one
instance per run, `method = METHODS[args.method](args, device)`, and calls it at fixed points; every
hook below does nothing by default, so a method overrides only what it needs:

    setup(model, meta)        change the model, explicitly: freeze(model), then attach modules at
                              sites (model.attach) or wrap modules (replace_modules); what is
                              added trains
    objective(logits, y, mean)  the training loss; default: the task's mean loss `mean`
                              (MemFT's token weightings)
    aux_loss(model)           a tensor added to the objective, or None (MoC's router losses)
    lr_scales(model)          {parameter: learning-rate multiplier} for those not at --lr
                              (memory banks)
    after_backward(model)     gradients are unscaled; clipping and the optimizer step follow
                              (GRIT's statistics; K-FAC preconditioning before clipping)
    before_step(model)        gradients are clipped; the optimizer step follows (GRIT's released
                              preconditioning)
    after_step(model)         right after the optimizer step (GRIT's inversion, reprojection)
    state_dict() / load_state_dict(state)   the method's own training state, saved in ckpt.pt
                              (exact resume)
    metrics(model)            extra fields for each metrics.jsonl line with a train loss (router
                              health)
    summary(model)            extra fields for summary.json
    export(model, out_dir)    files a finished run leaves behind (adapter.safetensors)

Class attributes say where and how it runs:

    datasets   the datasets it trains on (each belongs to a task: catalog.py: TASKS)
    defaults   flag defaults of this method; explicit flags win
               (and derived_defaults(args): defaults that follow from its other flags, e.g. PRB's
               full pooling sets the published 128-token window)
    add_flags  fn(parser): the method's CLI flag group (methods of one module may share one)
    reads_logits  True where objective() reads the logits (MemFT's token weightings): its runs
               compute the plain loss, never the chunked one (plumbing/losses.py), which has no
               logits
    splits_batches  False where its objective or hooks need the whole batch in one pass
               (torchrun, --grad_accum then refuse it): objective() gets each part's share of the
               batch's mean loss, aux_loss() is averaged over the parts, and the hooks see the
               summed gradients

Old flag spellings of a method (--rank, --alpha, ...) live in plumbing/compat.py, not here.

Weight-level methods use `replace_modules` (LoRA, MemFT's MLP adapter): it is the one way to swap a
module of the model for a wrapper, and it never touches modules attached at sites.
"""


import torch


def freeze(model):
    """Stop every parameter of `model` from training; returns the model. Methods call this first,
    then add the modules that train (attach, replace_modules), so what trains is explicit and
    independent of order."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def replace_modules(model, match, wrap):
    """Replace every submodule for which match(name, module) is true by wrap(module), in place;
    returns the names. Modules attached at sites ("sites.*") are never matched, so a method never
    wraps another method's module."""
    chosen = [name for name, m in model.named_modules() if name and not name.startswith("sites.")
              and match(name, m)]
    for name in chosen:  # collected first: wrapping while iterating would visit the wrappers
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, wrap(getattr(parent, child)))
    return chosen


def store_frozen_in(model, dtype):
    """Every frozen matrix in the compute dtype (bf16 under --dtype bfloat16, the CUDA default):
    autocast would otherwise recast each fp32 frozen matrix at every forward and again for the
    backward, and the model would hold it twice. What trains, and its optimizer state, stay fp32;
    so do frozen vectors (LayerNorm, biases: a fraction of a percent of the weights, and a CPU
    LayerNorm refuses bf16 parameters on an fp32 input); the residual stream stays fp32 (model.py);
    exports are written in fp32. Returns the model."""
    if dtype != torch.float32:
        for p in model.parameters():
            if not p.requires_grad and p.dim() >= 2:
                p.data = p.data.to(dtype)
    return model


def save_tensors(model, path, keep):
    """The model's tensors whose names pass keep(name), as safetensors, written atomically: how a
    method exports what peft cannot load (register banks, memory banks, atoms) beside the run's PEFT
    adapter."""
    from plumbing.checkpoints import write_safetensors
    # fp32 on disk, also where frozen tensors trained in bf16 (store_frozen_in, above)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if keep(k)}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    write_safetensors(state, path, {"format": "pt"})  # whole or not at all


class Method:
    datasets = ()
    defaults = {}
    add_flags = None
    reads_logits = False
    # its step is the same when a batch is split over processes or --grad_accum passes
    splits_batches = True
    splits_batches_not = ""  # why not, where it is not

    def __init__(self, args, device="cpu"):
        self.args, self.device = args, device

    @classmethod
    def derived_defaults(cls, args):
        """Flag defaults that depend on this method's other flags (explicit flags still win)."""
        return {}

    def setup(self, model, meta):
        """Change the model; meta: the task's data description (vocab_size, labels, ...)."""

    def objective(self, logits, targets, mean_loss):
        return mean_loss

    def aux_loss(self, model):
        return None

    def lr_scales(self, model):
        return {}

    def after_backward(self, model):
        pass

    def before_step(self, model):
        pass

    def after_step(self, model):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def metrics(self, model):
        return {}

    def summary(self, model):
        return {}

    def export(self, model, out_dir):
        pass


class FullFineTuning(Method):
    """Every weight trains; nothing is attached or frozen. A GPT trained this way saves itself in
    the Hugging Face layout (config.json + model.safetensors), so its run folder is a base for
    --init_from."""
    datasets = ("emotion", "squadtext")

    def export(self, model, out_dir):
        if model.architecture == "gpt" and not model.sites:
            model.save_pretrained(out_dir)
