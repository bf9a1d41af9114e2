"""MLflow pyfunc flavour of a registered mdm model (logged as "model from code").

    model = mlflow.pyfunc.load_model("models:/mdm@stage-128")
    out = model.predict(pd.DataFrame({"prompt": ["fox face, noto style"], "seed": [0]}),
                        params={"steps": 25, "sampler": "dpmpp_2m", "guidance_scale": 3.0})
    out["image"][0]   # PNG bytes at the top resolution (params["resolution"] picks another)

Input columns: ``prompt`` (text models), ``label`` (class models), optional
``negative_prompt`` and ``seed`` (default: the row index). One generated image per row.
"""

from __future__ import annotations

import io

import mlflow.models
import mlflow.pyfunc


class MDMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from mdm.pipeline import MDMPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = MDMPipeline.from_pretrained(context.artifacts["weights"], device=device)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from mdm.data import to_pil

        params = dict(params or {})
        resolutions = self.pipe.resolutions
        res = int(params.get("resolution", resolutions[-1]))
        if res not in resolutions:
            raise ValueError(f"resolution {res} is not one of the model's {resolutions}")
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        n = len(df)
        if n == 0:
            return pd.DataFrame({"prompt": [], "seed": [], "resolution": [], "image": []})
        kind = self.pipe.config.model.conditioning.kind
        prompts = [str(p) for p in df["prompt"]] if kind == "text" and "prompt" in df else None
        if kind == "text" and prompts is None:
            prompts = [""] * n
        labels = [int(x) for x in df["label"]] if kind == "class" and "label" in df else None
        negative = [str(x) for x in df["negative_prompt"]] if "negative_prompt" in df else None
        seeds = [int(s) for s in df["seed"]] if "seed" in df else list(range(n))
        images = self.pipe.generate(
            prompts,
            num_samples=n,
            labels=labels,
            negative_prompt=negative,
            guidance_scale=float(params.get("guidance_scale", 3.0)),
            steps=int(params.get("steps", 25)),
            sampler=str(params.get("sampler", "dpmpp_2m")),
            seeds=seeds,
        )
        chosen = images[resolutions.index(res)]
        pngs = []
        for x in chosen:
            buf = io.BytesIO()
            to_pil(x).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return pd.DataFrame({"prompt": prompts or [""] * n, "seed": seeds, "resolution": [res] * n, "image": pngs})


mlflow.models.set_model(MDMPyfunc())
