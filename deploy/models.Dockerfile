# The model bundle: every model file the stack serves, in one image, for Kubernetes' init
# containers (k8s/overlays/dev) or to fill the shared models volume (k8s/base/models-pvc.yaml).
#
#   make torchserve-store
#   docker build -f deploy/models.Dockerfile -t modelyard-models:0.1.0 .
#
# Layout, one folder per server:
#   /bundle/gateway/     the gateway's model repository: ONNX models, remote models' config.yaml
#   /bundle/tfserving/   <model>/<version>/saved_model.pb, as TF Serving reads it
#   /bundle/torchserve/  TorchServe's model store (.mar)
FROM busybox:1.37.0
COPY model_repo/affine /bundle/gateway/affine
COPY model_repo/mlp /bundle/gateway/mlp
COPY deploy/compose-model-repo/mlp_torch /bundle/gateway/mlp_torch
COPY deploy/compose-model-repo/affine_tf /bundle/gateway/affine_tf
# model_repo keeps each SavedModel in <version>/model.savedmodel/; TF Serving wants it at <version>/.
COPY model_repo/affine_tf/1/model.savedmodel /bundle/tfserving/affine_tf/1
COPY model_repo/affine_tf/2/model.savedmodel /bundle/tfserving/affine_tf/2
COPY deploy/torchserve/model-store/mlp_torch-v1.mar deploy/torchserve/model-store/mlp_torch-v2.mar /bundle/torchserve/
# Any user may read it: each pod's init container runs as that pod's own non-root user.
RUN chmod -R a+rX /bundle
USER 65534:65534
