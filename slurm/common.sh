# shellcheck shell=bash
# Shared machinery of the megatron-emoe Slurm scripts (sourced by slurm/*.sbatch, never run).
#
# Slurm concerns only, once: required-variable checks, the YAML recipe file(s) (CONFIG, checked
# before anything starts), the rendezvous from Slurm's variables and the node/GPU counts, the
# NCCL/PyTorch environment, paths (data, tokenizer, outputs), the exit duration from the job's time
# limit, rendering of the launcher and training commands, the dry run, and requeue-and-resume.
# What the training run is (model, routing, parallelism, precision, schedule) lives in the YAML
# file given to the entry as `--config` (examples/configs/olmoe_1b_7b.yaml by default), so both
# scripts build the same model and the numbers are written once.
#
# A script sources this file, names its YAML file(s) with emoe_config, appends its own flags to
# the array EMOE_ARGS with the helpers below, then calls `emoe_launch "$@"` (its trailing
# arguments become extra Megatron flags; given last, they override the YAML and the script's own).
# Every variable is read as ${VAR:-default}, so anything can be set from the environment
# (`VAR=... sbatch ...` or `sbatch --export=ALL,VAR=...`).

# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
emoe_log() { printf '[emoe %s] %s\n' "$(date '+%F %T')" "$*" >&2; }

# emoe_die MESSAGE...: refuse bad input (a variable, a file, a flag, the allocation) before anything
# starts: one line on stderr, exit status 2.
emoe_die() { emoe_die_with 2 "$@"; }

# emoe_die_with STATUS MESSAGE...: one line on stderr, exit with STATUS.
emoe_die_with() {
    local status=$1
    shift
    printf 'ERROR: %s\n' "$*" >&2
    exit "$status"
}

emoe_dry_run() { [[ ${DRY_RUN:-0} != 0 && -n ${DRY_RUN:-} ]]; }

# emoe_require NAME "what it is": stop with a clear message when NAME is unset or empty.
emoe_require() {
    local name=$1 what=$2
    if [[ -z ${!name:-} ]]; then
        emoe_die "$name is not set: $what. Export it before sbatch (or use sbatch --export=ALL,$name=...)."
    fi
}

# emoe_is_int NAME...: every named variable holds a non-negative integer.
emoe_is_int() {
    local name
    for name in "$@"; do
        [[ ${!name} =~ ^[0-9]+$ ]] || emoe_die "$name must be a non-negative integer, got '${!name}'"
    done
}

# emoe_quote ARG...: one line, each argument quoted so that both bash and Python's shlex.split
# read it back unchanged (plain words as they are, anything else in single quotes).
emoe_quote() {
    local arg out=() q="'\\''"
    for arg in "$@"; do
        if [[ -n $arg && $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+=("$arg")
        else
            out+=("'${arg//\'/$q}'")
        fi
    done
    printf '%s\n' "${out[*]}"
}

# emoe_first_host NODELIST: the first host of a Slurm node list, without scontrol.
# Handles "node07", "node[01-04]", "node[01-04,07],gpu[1-2]", "a,b", "rack[1-2]-n[3-4]".
emoe_first_host() {
    local list=$1 host="" c i depth=0
    for ((i = 0; i < ${#list}; i++)); do
        c=${list:i:1}
        if [[ $c == '[' ]]; then
            depth=$((depth + 1))
        elif [[ $c == ']' ]]; then
            depth=$((depth - 1))
        elif [[ $c == ',' && $depth == 0 ]]; then
            break
        fi
        host+=$c
    done
    local pre rest group post
    while [[ $host == *'['*']'* ]]; do
        pre=${host%%\[*}
        rest=${host#*\[}
        group=${rest%%\]*}
        post=${rest#*\]}
        group=${group%%,*}
        group=${group%%-*}
        host=$pre$group$post
    done
    printf '%s\n' "$host"
}

# emoe_slurm_time_to_secs "[D-]HH:MM:SS" | "MM:SS" | "MM" -> seconds (empty for UNLIMITED etc.).
emoe_slurm_time_to_secs() {
    local t=$1 days=0 h=0 m=0 s=0
    [[ $t =~ ^[0-9-]+(:[0-9]+)*$ ]] || return 0
    if [[ $t == *-* ]]; then
        days=${t%%-*}
        t=${t#*-}
        IFS=: read -r h m s <<<"$t"
    else
        local parts
        IFS=: read -r -a parts <<<"$t"
        case ${#parts[@]} in
            1) m=${parts[0]} ;;
            2) m=${parts[0]} s=${parts[1]} ;;
            *) h=${parts[0]} m=${parts[1]} s=${parts[2]} ;;
        esac
    fi
    echo $((10#${days:-0} * 86400 + 10#${h:-0} * 3600 + 10#${m:-0} * 60 + 10#${s:-0}))
}

# emoe_argv_value FLAG ARG...: the value of the last FLAG (or FLAG=value) among ARG...
emoe_argv_value() {
    local flag=$1 value="" prev=""
    shift
    local arg
    for arg in "$@"; do
        if [[ $prev == "$flag" ]]; then
            value=$arg
        elif [[ $arg == "$flag="* ]]; then
            value=${arg#*=}
        fi
        prev=$arg
    done
    printf '%s\n' "$value"
}

# emoe_abspath PATH: PATH made absolute and free of symlinks (need not exist).
emoe_abspath() { realpath -m -- "$1" 2>/dev/null || printf '%s\n' "$1"; }

# emoe_config_value KEY FILE: the value of the top-level KEY (a flag name, with dashes or
# underscores) in the flat YAML FILE (the last one if repeated, unquoted; "" when absent). Enough
# for the `name: value` lines of examples/configs/; the entry itself reads the file with a YAML
# parser.
emoe_config_value() {
    local want=${1//_/-} file=$2 line key value=""
    local re='^["'\'']?(--)?([A-Za-z0-9_-]+)["'\'']?[[:space:]]*:[[:space:]]*(.*)$'
    if [[ -f $file && -r $file ]]; then
        while IFS= read -r line || [[ -n $line ]]; do
            [[ $line =~ $re ]] || continue
            key=${BASH_REMATCH[2]//_/-}
            [[ $key == "$want" ]] || continue
            value=${BASH_REMATCH[3]%$'\r'}
            [[ $value == '#'* ]] && value=""
            value=${value%%[[:space:]]#*}
            value=${value%"${value##*[![:space:]]}"}
            value=${value#[\"\']}
            value=${value%[\"\']}
        done <"$file"
    fi
    printf '%s\n' "$value"
}

# emoe_checkpoint_iteration DIR: the iteration of DIR's latest checkpoint ("" if none).
emoe_checkpoint_iteration() {
    local tracker=$1/latest_checkpointed_iteration.txt
    [[ -f $tracker ]] || return 0
    tr -d '[:space:]' <"$tracker"
    echo
}

# ------------------------------------------------------------------------------------------------
# Rendezvous: who is the master, on which port, how many nodes and GPUs.
# ------------------------------------------------------------------------------------------------
emoe_setup_rendezvous() {
    emoe_require SLURM_JOB_ID "not inside a Slurm job: submit with sbatch (a dry run needs fake SLURM_* variables)"
    NNODES=${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    emoe_is_int NNODES GPUS_PER_NODE SLURM_JOB_ID
    if ((10#$NNODES < 1 || 10#$GPUS_PER_NODE < 1)); then
        emoe_die "NNODES and GPUS_PER_NODE must be at least 1, got NNODES=$NNODES GPUS_PER_NODE=$GPUS_PER_NODE"
    fi
    WORLD_SIZE=$((10#$NNODES * 10#$GPUS_PER_NODE))

    if [[ -z ${MASTER_ADDR:-} ]]; then
        emoe_require SLURM_JOB_NODELIST "the job's node list (or set MASTER_ADDR)"
        if command -v scontrol >/dev/null 2>&1; then
            MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1 || true)
        fi
        if [[ -z ${MASTER_ADDR:-} ]]; then
            MASTER_ADDR=$(emoe_first_host "$SLURM_JOB_NODELIST")
        fi
    fi
    # One port per job (and per requeue, so a restarted job never meets its old store).
    MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID + ${SLURM_RESTART_COUNT:-0}) % 20000))}
    emoe_is_int MASTER_PORT
    export MASTER_ADDR MASTER_PORT
}

# ------------------------------------------------------------------------------------------------
# Environment of the training processes (srun passes the batch environment on to every node).
# ------------------------------------------------------------------------------------------------
# Site hooks: exported (and shown by the dry run) only when set, e.g. NCCL_SOCKET_IFNAME=ib0.
EMOE_SITE_VARS=(NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX NCCL_IB_TIMEOUT
    NCCL_IB_RETRY_CNT NCCL_IB_SL NCCL_IB_DISABLE NCCL_NET NCCL_NET_GDR_LEVEL NCCL_CROSS_NIC
    NCCL_COLLNET_ENABLE NCCL_NVLS_ENABLE NCCL_ALGO NCCL_PROTO NCCL_DEBUG_SUBSYS NCCL_TOPO_FILE
    UCX_NET_DEVICES TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT NVTE_FUSED_ATTN
    NVTE_FLASH_ATTN HF_HOME HF_HUB_OFFLINE TRITON_CACHE_DIR)
EMOE_ENV_VARS=()

emoe_setup_env() {
    # Megatron overlaps communication with compute only with a single hardware queue.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # Fail a rank on an NCCL error or timeout instead of hanging until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    export PYTHONUNBUFFERED=1
    # How long torchrun lets its workers finish (save a checkpoint) after it gets SIGTERM before it
    # kills them. Read by torchrun since PyTorch 2.12 (pytorch#172596); older torchrun always
    # allows 30 s, so with a slow file system use LAUNCHER=srun there.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-230}
    if [[ -n ${NCCL_SOCKET_IFNAME:-} && -z ${GLOO_SOCKET_IFNAME:-} ]]; then
        export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
    fi
    export PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}
    EMOE_ENV_VARS=(MASTER_ADDR MASTER_PORT CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING
        TORCH_NCCL_AVOID_RECORD_STREAMS NCCL_DEBUG OMP_NUM_THREADS PYTHONUNBUFFERED
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT PYTHONPATH)
    local name
    for name in "${EMOE_SITE_VARS[@]}"; do
        if [[ -n ${!name:-} ]]; then
            export "${name?}"
            EMOE_ENV_VARS+=("$name")
        fi
    done
}

# ------------------------------------------------------------------------------------------------
# The training flags: the YAML recipe first (--config), then paths and the Slurm-derived flags.
# Each helper appends to EMOE_ARGS.
# ------------------------------------------------------------------------------------------------
EMOE_ARGS=()
EMOE_CONFIGS=()

# emoe_config NAME DEFAULT WHAT: the YAML file named by variable NAME (default DEFAULT; a relative
# path is taken from the repository) becomes `--config FILE` in EMOE_ARGS, with FILE absolute. A
# missing file stops the script before anything starts: one line on stderr, exit status 2.
emoe_config() {
    local name=$1 default=$2 what=$3 given path
    given=${!name:-$default}
    path=$given
    [[ $path == /* ]] || path=$REPO_DIR/$path
    path=$(emoe_abspath "$path")
    if [[ ! -f $path || ! -r $path ]]; then
        emoe_die_with 2 "$name=$given: no such file ($path); $name is $what"
    fi
    printf -v "$name" '%s' "$path"
    EMOE_CONFIGS+=("$path")
    EMOE_ARGS+=(--config "$path")
}

# Data and tokenizer. DATA_PREFIX may be a blend: "0.7 /data/a_text_document 0.3 /data/b_text_document".
emoe_data_args() {
    emoe_require DATA_PREFIX "$1"
    emoe_require TOKENIZER "the tokenizer (--tokenizer-model): a Hugging Face tokenizer folder or name"
    local prefixes word
    read -r -a prefixes <<<"$DATA_PREFIX"
    if ! emoe_dry_run && [[ ${CHECK_PATHS:-1} != 0 ]]; then
        for word in "${prefixes[@]}"; do
            [[ $word =~ ^[0-9.eE+-]+$ ]] && continue # a blend weight
            [[ -f $word.bin && -f $word.idx ]] || emoe_die "DATA_PREFIX: no $word.bin/.idx (give the prefix without extension; CHECK_PATHS=0 skips this check)"
        done
    fi
    EMOE_ARGS+=(
        --data-path "${prefixes[@]}"
        --tokenizer-model "$TOKENIZER"
        --data-cache-path "${DATA_CACHE:-$OUTPUT_DIR/data_cache}"
    )
}

# Outputs and what requeue-and-resume needs: checkpoints in SAVE (saved also on SIGTERM, by
# --exit-signal-handler), TensorBoard, and a stop before the job's time limit.
emoe_checkpoint_args() {
    local save=$1
    EMOE_ARGS+=(
        --save "$save"
        --exit-signal-handler
        --tensorboard-dir "${TENSORBOARD_DIR:-$OUTPUT_DIR/tensorboard}"
    )
    EXIT_MARGIN_MINS=${EXIT_MARGIN_MINS:-10}
    emoe_is_int EXIT_MARGIN_MINS
    if [[ -n ${EXIT_DURATION_MINS:-} && ! $EXIT_DURATION_MINS =~ ^[0-9]+$ ]]; then
        emoe_die "EXIT_DURATION_MINS must be whole minutes (0: never), got '$EXIT_DURATION_MINS'"
    fi
    local mins
    mins=$(emoe_exit_duration_mins)
    if [[ -n $mins ]]; then
        EMOE_ARGS+=(--exit-duration-in-mins "$mins")
    fi
}

# Minutes Megatron may train before it saves and exits by itself: EXIT_DURATION_MINS if set (0 =
# never), else the job's remaining time less EXIT_MARGIN_MINS (from SLURM_JOB_END_TIME, or squeue).
emoe_exit_duration_mins() {
    if [[ -n ${EXIT_DURATION_MINS:-} ]]; then
        if [[ $EXIT_DURATION_MINS != 0 ]]; then echo "$EXIT_DURATION_MINS"; fi
        return 0
    fi
    local left="" margin=$EXIT_MARGIN_MINS
    if [[ ${SLURM_JOB_END_TIME:-} =~ ^[0-9]+$ ]]; then
        left=$((SLURM_JOB_END_TIME - $(date +%s)))
    elif command -v squeue >/dev/null 2>&1; then
        left=$(emoe_slurm_time_to_secs "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null | head -n1)")
    fi
    [[ -n $left ]] || return 0
    local mins=$((left / 60 - margin))
    if ((mins >= 1)); then echo "$mins"; fi
}

# ------------------------------------------------------------------------------------------------
# Rendering, dry run, launch, requeue-and-resume.
# ------------------------------------------------------------------------------------------------
# The training entry, run as a module (PYTHONPATH holds REPO_DIR, so an uninstalled checkout works).
EMOE_ENTRY_MODULE=megatron_emoe.cli.pretrain

# LAUNCHER=torchrun (default): one torchrun per node, c10d rendezvous on MASTER_ADDR:MASTER_PORT,
# the entry run with `--module`.
# LAUNCHER=srun: one task per GPU, no torchrun; each task gets RANK/LOCAL_RANK/WORLD_SIZE from
# Slurm (submit with --ntasks-per-node=$GPUS_PER_NODE) and runs `python -m` the entry.
emoe_render_launcher() {
    local srun_extra=() cpus=${CPUS_PER_TASK:-}
    read -r -a srun_extra <<<"${SRUN_EXTRA_ARGS:-}"
    EMOE_LAUNCH_CMD=(srun --nodes="$NNODES" --kill-on-bad-exit=1)
    case ${LAUNCHER:-torchrun} in
        torchrun)
            cpus=${cpus:-${SLURM_CPUS_ON_NODE:-}}
            EMOE_LAUNCH_CMD+=(--ntasks="$NNODES" --ntasks-per-node=1)
            [[ -n $cpus ]] && EMOE_LAUNCH_CMD+=(--cpus-per-task="$cpus")
            EMOE_LAUNCH_CMD+=(${srun_extra[@]+"${srun_extra[@]}"}
                "${TORCHRUN:-torchrun}"
                --nnodes "$NNODES"
                --nproc-per-node "$GPUS_PER_NODE"
                --rdzv-backend c10d
                --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
                --rdzv-id "$SLURM_JOB_ID"
                --max-restarts 0
                --module
            )
            ;;
        srun)
            if [[ -z $cpus && ${SLURM_CPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
                cpus=$((SLURM_CPUS_ON_NODE / GPUS_PER_NODE))
            fi
            EMOE_LAUNCH_CMD+=(--ntasks="$WORLD_SIZE" --ntasks-per-node="$GPUS_PER_NODE")
            [[ -n $cpus && $cpus != 0 ]] && EMOE_LAUNCH_CMD+=(--cpus-per-task="$cpus")
            # shellcheck disable=SC2016 # expanded by the task's bash, not here
            EMOE_LAUNCH_CMD+=(${srun_extra[@]+"${srun_extra[@]}"}
                bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'
                emoe-task "${PYTHON:-python}" -m
            )
            ;;
        *) emoe_die "LAUNCHER must be torchrun or srun, got '${LAUNCHER}'" ;;
    esac
}

EMOE_REQUEUE=0     # set by the USR1 trap: checkpoint, then requeue
EMOE_TERMINATING=0 # set by the TERM trap: cancelled or preempted, do not requeue
EMOE_STEP_PID=""
EMOE_WATCHDOG_PID=""

# Ask the training step to checkpoint and exit. Not `kill $srun_pid`: srun turns SIGTERM into
# SIGKILL for its tasks. `scancel --signal` reaches every process of the job's steps (torchrun,
# the Python workers and their data-loader workers) but not this batch shell.
_emoe_signal_step() {
    scancel --signal="$1" "$SLURM_JOB_ID" || emoe_log "scancel --signal=$1 $SLURM_JOB_ID failed"
}

_emoe_requeue() {
    emoe_log "requeueing job $SLURM_JOB_ID: $1"
    scontrol requeue "$SLURM_JOB_ID" || emoe_log "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)"
}

_emoe_on_usr1() {
    emoe_log "got SIGUSR1 (time limit or preemption ahead): asking the training step to save a checkpoint and exit"
    if [[ $EMOE_REQUEUE == 1 ]]; then return 0; fi
    EMOE_REQUEUE=1
    _emoe_signal_step TERM
    # If the step is not done in time, requeue anyway: the last complete checkpoint is still there.
    local after=${REQUEUE_WATCHDOG_S:-240}
    if [[ $after =~ ^[0-9]+$ && $after != 0 ]]; then
        (
            sleep "$after"
            _emoe_requeue "the training step is still running ${after}s after SIGTERM"
        ) &
        EMOE_WATCHDOG_PID=$!
    fi
}

_emoe_on_term() {
    emoe_log "got SIGTERM (job cancelled or preempted): letting the training step save and exit; no requeue"
    EMOE_TERMINATING=1
}

# emoe_training_value NAME: the value of flag --NAME in the training command as the entry reads
# it, from a `--config FILE` (its NAME line) or a --NAME flag, the last one in the command winning
# ("" when absent: Megatron's default).
emoe_training_value() {
    local name=${1//_/-} found="" prev="" arg value
    for arg in "${EMOE_TRAIN_CMD[@]}"; do
        if [[ $prev == "--$name" ]]; then
            found=$arg
        elif [[ $arg == "--$name="* ]]; then
            found=${arg#*=}
        elif [[ $prev == --config ]]; then
            value=$(emoe_config_value "$name" "$arg")
            if [[ -n $value ]]; then found=$value; fi
        fi
        prev=$arg
    done
    printf '%s\n' "$found"
}

_emoe_train_iters() { emoe_training_value train-iters; }

# Should a cleanly finished step be followed by another job? Yes when training stopped before its
# last iteration (--exit-duration-in-mins) and requeueing is allowed.
_emoe_unfinished() {
    local save iters done_iter
    save=$(emoe_argv_value --save "${EMOE_TRAIN_CMD[@]}")
    iters=$(_emoe_train_iters)
    done_iter=$(emoe_checkpoint_iteration "$save")
    [[ $iters =~ ^[0-9]+$ && $done_iter =~ ^[0-9]+$ ]] && ((10#$done_iter < 10#$iters))
}

# emoe_check_layout: the allocation fits the training command's parallel sizes, before anything
# starts. NNODES x GPUS_PER_NODE processes must be a multiple of tensor x pipeline x context
# parallel and of expert-tensor x expert-model x pipeline parallel (Megatron's rank grids), NNODES
# must be the job's node count, and the job's tasks what the launcher starts: one per node for
# torchrun, one per process for srun.
emoe_check_layout() {
    local name value tp pp cp ep etp
    for name in tensor-model-parallel-size pipeline-model-parallel-size context-parallel-size \
        expert-model-parallel-size expert-tensor-parallel-size; do
        value=$(emoe_training_value "$name")
        if [[ -n $value && ! $value =~ ^[1-9][0-9]*$ ]]; then
            emoe_die "--$name must be a whole number >= 1, got '$value'"
        fi
    done
    tp=$(emoe_training_value tensor-model-parallel-size)
    pp=$(emoe_training_value pipeline-model-parallel-size)
    cp=$(emoe_training_value context-parallel-size)
    ep=$(emoe_training_value expert-model-parallel-size)
    etp=$(emoe_training_value expert-tensor-parallel-size)
    tp=${tp:-1} pp=${pp:-1} cp=${cp:-1} ep=${ep:-1}
    etp=${etp:-$tp} # Megatron's default: the dense tensor-parallel size

    if [[ -n ${SLURM_NNODES:-} && $NNODES != "$SLURM_NNODES" ]]; then
        emoe_die "NNODES=$NNODES does not match the job's $SLURM_NNODES node(s): submit with sbatch --nodes=$NNODES, or leave NNODES unset"
    fi
    if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]] && ((SLURM_GPUS_ON_NODE > 0 && 10#$GPUS_PER_NODE > SLURM_GPUS_ON_NODE)); then
        emoe_die "GPUS_PER_NODE=$GPUS_PER_NODE is more than the job's $SLURM_GPUS_ON_NODE GPU(s) per node: submit with --gpus-per-node=$GPUS_PER_NODE, or lower GPUS_PER_NODE"
    fi
    local tasks=$NNODES per_node=1 unit="node (torchrun starts the GPUS_PER_NODE=$GPUS_PER_NODE processes)"
    if [[ ${LAUNCHER:-torchrun} == srun ]]; then
        tasks=$WORLD_SIZE per_node=$GPUS_PER_NODE unit="process"
    fi
    if [[ -n ${SLURM_NTASKS_PER_NODE:-} && $SLURM_NTASKS_PER_NODE != "$per_node" ]]; then
        emoe_die "--ntasks-per-node=$SLURM_NTASKS_PER_NODE does not fit LAUNCHER=${LAUNCHER:-torchrun}: submit with --ntasks-per-node=$per_node, one task per $unit"
    fi
    if [[ -n ${SLURM_NTASKS:-} && $SLURM_NTASKS != "$tasks" ]]; then
        emoe_die "--ntasks=$SLURM_NTASKS does not fit LAUNCHER=${LAUNCHER:-torchrun} on $NNODES node(s): submit with --ntasks=$tasks, one task per $unit"
    fi

    local world="NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE = $WORLD_SIZE processes"
    if ((WORLD_SIZE % (tp * pp * cp) != 0)); then
        emoe_die "$world is not a multiple of --tensor-model-parallel-size $tp x --pipeline-model-parallel-size $pp x --context-parallel-size $cp = $((tp * pp * cp)): submit with a node count that makes it one, or change the parallel sizes"
    fi
    if ((WORLD_SIZE % (etp * ep * pp) != 0)); then
        emoe_die "$world is not a multiple of --expert-tensor-parallel-size $etp x --expert-model-parallel-size $ep x --pipeline-model-parallel-size $pp = $((etp * ep * pp)): submit with a node count that makes it one, or change the parallel sizes"
    fi
}

# emoe_check_writable WHAT PATH: PATH is a folder this job can write, or one it can create.
emoe_check_writable() {
    local what=$1 given=$2 path probe
    path=$(emoe_abspath "$given")
    probe=$path
    while [[ ! -e $probe && $probe != / ]]; do probe=$(dirname "$probe"); done
    if [[ ! -d $probe ]]; then
        emoe_die "$what $given: not writable ($probe is not a folder); give a folder this job can create or write"
    elif [[ ! -w $probe || ! -x $probe ]]; then
        emoe_die "$what $given: not writable ($probe is read-only for user $(id -un)); give a folder this job can create or write"
    fi
}

# emoe_check_outputs: every folder the run writes (--save, the output folder, TensorBoard, the
# data cache) is writable, before anything starts.
emoe_check_outputs() {
    local flag value
    emoe_check_writable "OUTPUT_DIR" "$OUTPUT_DIR"
    for flag in --save --tensorboard-dir --data-cache-path; do
        value=$(emoe_argv_value "$flag" "${EMOE_TRAIN_CMD[@]}")
        if [[ -n $value ]]; then emoe_check_writable "$flag" "$value"; fi
    done
}

# emoe_requeue_reason STATUS: after the training step exited with STATUS, why the job should be
# requeued; nothing when it should not (cancelled or preempted, REQUEUE=0, a crash, training done,
# or MAX_REQUEUES reached).
emoe_requeue_reason() {
    local rc=$1 reason=""
    if [[ ${EMOE_TERMINATING:-0} == 1 || ${REQUEUE:-1} == 0 ]]; then
        return 0
    elif [[ ${EMOE_REQUEUE:-0} == 1 ]]; then
        reason="time limit or preemption signal (USR1)"
    elif [[ $rc == 0 ]] && _emoe_unfinished; then
        reason="training stopped cleanly before --train-iters (exit duration or exit interval reached)"
    fi
    [[ -n $reason ]] || return 0
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-50}
    if ((restarts >= max)); then
        emoe_log "not requeueing ($reason): already restarted $restarts times (MAX_REQUEUES=$max)"
        return 0
    fi
    printf '%s\n' "$reason"
}

emoe_print_dry_run() {
    local name
    echo "# megatron-emoe dry run of ${EMOE_SCRIPT_NAME:-slurm script}: nothing is launched"
    echo "=== EMOE_ENV ==="
    for name in "${EMOE_ENV_VARS[@]}"; do
        printf '%s=%s\n' "$name" "$(emoe_quote "${!name}")"
    done
    echo "=== EMOE_LAUNCHER ==="
    emoe_quote "${EMOE_LAUNCH_CMD[@]}"
    echo "=== EMOE_TRAINING ==="
    emoe_quote "${EMOE_TRAIN_CMD[@]}"
    echo "=== EMOE_RESUME ==="
    echo "${EMOE_RESUME_NOTE:-}"
    echo "=== EMOE_END ==="
}

# emoe_launch EXTRA_FLAG...: render the commands; print them (DRY_RUN=1) or run them with
# requeue-and-resume.
emoe_launch() {
    emoe_render_launcher
    EMOE_TRAIN_CMD=("$EMOE_ENTRY_MODULE" "${EMOE_ARGS[@]}" "$@")
    emoe_check_layout
    emoe_check_outputs
    if emoe_dry_run; then
        emoe_print_dry_run
        return 0
    fi

    mkdir -p "$OUTPUT_DIR"
    emoe_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) x $GPUS_PER_NODE GPU(s), master $MASTER_ADDR:$MASTER_PORT"
    emoe_log "${EMOE_RESUME_NOTE:-}"
    emoe_log "launcher: $(emoe_quote "${EMOE_LAUNCH_CMD[@]}")"
    emoe_log "training: $(emoe_quote "${EMOE_TRAIN_CMD[@]}")"

    trap _emoe_on_usr1 USR1
    trap _emoe_on_term TERM
    # In the background, so that the traps run while the step is running (bash runs a trap only
    # between commands, and `wait` returns early for one).
    "${EMOE_LAUNCH_CMD[@]}" "${EMOE_TRAIN_CMD[@]}" &
    EMOE_STEP_PID=$!
    local rc
    while :; do
        rc=0
        wait "$EMOE_STEP_PID" || rc=$?
        if ((rc > 128)) && kill -0 "$EMOE_STEP_PID" 2>/dev/null; then
            continue # woken by a trap; the step is still running
        fi
        break
    done
    trap 'EMOE_REQUEUE=1' USR1 # too late to signal the step; still requeue
    if [[ -n $EMOE_WATCHDOG_PID ]]; then
        kill "$EMOE_WATCHDOG_PID" 2>/dev/null || true
    fi
    emoe_log "training step exited with status $rc"

    local reason
    reason=$(emoe_requeue_reason "$rc")
    if [[ -n $reason ]]; then
        _emoe_requeue "$reason; the next run resumes from the latest checkpoint"
        return 0
    fi
    return "$rc"
}

# Where outputs go; RUN_NAME must stay the same across requeues (it does: the job keeps its id
# and environment).
emoe_output_dirs() {
    RUN_NAME=${RUN_NAME:-$1}
    OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/runs/$RUN_NAME}
}
