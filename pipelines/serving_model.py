"""The MLflow model of a trained face embedder ("models from code": MLflow stores this file
with the model and runs it at load time; nothing is unpickled).

It imports only numpy, torch and mlflow, so `mlflow.pyfunc.load_model(...)` works in a
process without this project installed. The network itself is a `torch.export` program
(`program.pt2`, logged as an artifact) that takes aligned 112x112 RGB uint8 faces.

predict(faces (N, 112, 112, 3) uint8, params={"flip": bool, "batch_size": int})
    -> (N, D) float32, L2-normalised; with flip (the default, as evaluation uses), the
    normalised sum of the embeddings of each face and its mirror image.
"""

import mlflow
import numpy as np
import torch


class FaceEmbeddingModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.program = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        params = params or {}
        flip = bool(params.get("flip", True))
        batch = int(params.get("batch_size", 256))
        faces = np.asarray(model_input)
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (112, 112, 3):
            raise ValueError(f"expected aligned faces as uint8 (N, 112, 112, 3), got {faces.dtype} {faces.shape}")
        out = []
        with torch.no_grad():
            for i in range(0, len(faces), batch):
                x = torch.from_numpy(np.ascontiguousarray(faces[i:i + batch]))
                e = self.program(x)
                if flip:
                    e = e + self.program(torch.flip(x, dims=[2]))
                out.append(torch.nn.functional.normalize(e, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


mlflow.models.set_model(FaceEmbeddingModel())
