#!/bin/bash
# Sourced by the real-scale recipes: DEVICE_TYPE=npu (default) | cuda | cpu is the one variable that moves a
# recipe between Ascend and NVIDIA. It sets the device count per node, the launcher variables and the
# communication library's environment; the training flags do not change (platform/ picks hccl / nccl / gloo).
DEVICE_TYPE=${DEVICE_TYPE:-npu}
export MEGATRON_ASCEND_DEVICE=$DEVICE_TYPE
case "$DEVICE_TYPE" in
  npu)
    # Ascend (torch_npu + HCCL); see docs/ASCEND.md for the CANN / torch_npu install matrix
    [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ] && source /usr/local/Ascend/ascend-toolkit/set_env.sh
    DEVICES_PER_NODE=${DEVICES_PER_NODE:-8}          # Atlas 800T A2: 8 x 910B; A3 (910C): 16 dies per node
    export CPU_AFFINITY_CONF=1
    export PYTORCH_NPU_ALLOC_CONF=expandable_segments:True
    export TASK_QUEUE_ENABLE=2
    export HCCL_CONNECT_TIMEOUT=3600
    export HCCL_EXEC_TIMEOUT=3600
    export HCCL_BUFFSIZE=400
    ;;
  cuda)
    DEVICES_PER_NODE=${DEVICES_PER_NODE:-8}
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export NCCL_TIMEOUT=${NCCL_TIMEOUT:-3600}
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    ;;
  cpu)
    DEVICES_PER_NODE=${DEVICES_PER_NODE:-8}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ;;
  *)
    echo "error: DEVICE_TYPE=$DEVICE_TYPE is unknown; use npu, cuda or cpu" >&2
    exit 2
    ;;
esac
GPUS_PER_NODE=$DEVICES_PER_NODE                      # Megatron's name for the same thing
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$(( DEVICES_PER_NODE * NNODES ))
DISTRIBUTED_ARGS="--nproc_per_node $DEVICES_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
# print the layout of the job before it starts (no process is created): bash <recipe> SHOW_LAYOUT=1
run_or_show() {
  if [ "${SHOW_LAYOUT:-0}" = "1" ]; then
    WORLD_SIZE=$WORLD_SIZE python -m "$@" --show-layout
  else
    # shellcheck disable=SC2068
    torchrun $DISTRIBUTED_ARGS -m "$@"
  fi
}
