#!/usr/bin/env bash
# s3_torture_aws.sh - generate real S3 traffic with the AWS CLI, for s3slower.
#
# Against any S3 endpoint (AWS, MinIO, Ceph, VAST, ...) or, with no
# S3_ENDPOINT, against a local HTTPS S3 server it starts on 127.0.0.1 with a
# self-signed certificate and dummy credentials, and stops at the end.
#
# Every round does: PutObject (each size; sizes >= 8 MiB as a multipart
# upload), GetObject, HeadObject, ListObjectsV2 with a prefix over several
# pages, CopyObject, Put/GetObjectTagging, a presigned GET with curl, a GET of
# a missing key (404 expected), DeleteObject and DeleteObjects. It removes its
# own objects, and prints a summary of operations done and failed on stdout.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: s3_torture_aws.sh [options]

Environment:
  S3_ENDPOINT   endpoint URL (https://...); unset: start a local S3 server
  S3_BUCKET     existing bucket to use; unset: create a temporary one
  AWS_PROFILE   AWS CLI profile for a real endpoint (the CLI reads it)
  AWS_CLI       the AWS CLI command (default: aws)

Options:
  -n, --iterations N   rounds per worker (default 3)
  -d, --duration S     stop starting new rounds after S seconds (default 120)
  -c, --concurrency N  parallel workers (default 2)
  -s, --sizes LIST     object sizes, e.g. 4k,1m,64m (default 4k,1m,64m)
  -o, --ops LIST       operations to run, comma separated (default all):
                       put,get,head,list,copy,tagging,presign,missing,delete
      --short          one round, one worker, sizes 4k,1m,16m (a quick demo)
  -h, --help           this help

Examples:
  ./s3_torture_aws.sh --short                  # local server, ~10 s
  S3_ENDPOINT=https://minio.lan:9000 S3_BUCKET=bench ./s3_torture_aws.sh -c 8
  AWS_PROFILE=prod S3_BUCKET=my-bucket ./s3_torture_aws.sh -o put,get -n 10
EOF
}

die() { echo "s3_torture_aws.sh: error: $*" >&2; exit 2; }
note() { echo "s3_torture_aws.sh: $*" >&2; }

ITERATIONS=3 DURATION=120 CONCURRENCY=2 SIZES=4k,1m,64m
OPS=put,get,head,list,copy,tagging,presign,missing,delete
while [ $# -gt 0 ]; do
    case $1 in
        -n|--iterations) ITERATIONS=${2:?}; shift ;;
        -d|--duration) DURATION=${2:?}; shift ;;
        -c|--concurrency) CONCURRENCY=${2:?}; shift ;;
        -s|--sizes) SIZES=${2:?}; shift ;;
        -o|--ops) OPS=${2:?}; shift ;;
        --short) ITERATIONS=1 CONCURRENCY=1 SIZES=4k,1m,16m ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done
for value in "$ITERATIONS" "$DURATION" "$CONCURRENCY"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || die "not a positive integer: $value"
done
[ "$CONCURRENCY" -le 64 ] || die "concurrency above 64: $CONCURRENCY"
for op in ${OPS//,/ }; do
    case $op in put|get|head|list|copy|tagging|presign|missing|delete) ;;
        *) die "unknown operation: $op" ;; esac
done

# "4k" -> 4096 bytes.
size_bytes() {
    local n=${1%[kKmM]} unit=${1: -1}
    [[ $n =~ ^[0-9]+$ ]] || die "bad size: $1"
    case $unit in k|K) echo $((n * 1024)) ;; m|M) echo $((n * 1048576)) ;;
        *) echo "$1" ;; esac
}
SIZE_LIST=()
for size in ${SIZES//,/ }; do SIZE_LIST+=("$(size_bytes "$size")"); done
[ ${#SIZE_LIST[@]} -gt 0 ] || die "no sizes given"

AWS=${AWS_CLI:-aws}
command -v "${AWS%% *}" >/dev/null || die "AWS CLI not found (apt-get install awscli, or set AWS_CLI)"
command -v curl >/dev/null || die "curl not found (apt-get install curl)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/s3torture.XXXXXX")
SERVER_PID="" CREATED_BUCKET="" STARTED=$(date +%s)

cleanup() {
    local rc=$?
    set +e
    if [ -n "${BUCKET:-}" ] && [ -n "${RUN_PREFIX:-}" ]; then
        $AWS "${ENDPOINT_ARGS[@]}" s3 rm --recursive --quiet \
            "s3://$BUCKET/$RUN_PREFIX/" >/dev/null 2>&1
    fi
    if [ -n "$CREATED_BUCKET" ]; then
        $AWS "${ENDPOINT_ARGS[@]}" s3api delete-bucket --bucket "$BUCKET" \
            >/dev/null 2>&1
    fi
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ENDPOINT_ARGS=()
CURL_ARGS=()
if [ -z "${S3_ENDPOINT:-}" ]; then
    # A local endpoint: the tests' S3 server behind TLS, on loopback only.
    server=$(dirname "$(readlink -f "$0")")/tests/s3server.py
    [ -f "$server" ] || die "no S3_ENDPOINT and no local server at $server"
    command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1 \
        || die "could not create a self-signed certificate"
    ${PYTHON:-python3} "$server" --port 0 --cert "$WORK/cert.pem" \
        --key "$WORK/key.pem" >"$WORK/server.out" 2>"$WORK/server.err" &
    SERVER_PID=$!
    for _ in $(seq 100); do
        grep -q READY "$WORK/server.out" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || die "local S3 server failed: $(cat "$WORK/server.err")"
        sleep 0.1
    done
    port=$(awk '/READY/ {print $2}' "$WORK/server.out")
    [ -n "$port" ] || die "local S3 server did not start"
    S3_ENDPOINT=https://127.0.0.1:$port
    export AWS_ACCESS_KEY_ID=AKIDLOCALTORTURE AWS_SECRET_ACCESS_KEY=local-dummy-secret
    export AWS_DEFAULT_REGION=us-east-1 AWS_CA_BUNDLE=$WORK/cert.pem
    unset AWS_PROFILE AWS_SESSION_TOKEN
    CURL_ARGS=(--cacert "$WORK/cert.pem")
    note "local S3 server at $S3_ENDPOINT (pid $SERVER_PID)"
fi
ENDPOINT_ARGS=(--endpoint-url "$S3_ENDPOINT")
export AWS_PAGER="" AWS_RETRY_MODE=standard AWS_MAX_ATTEMPTS=1

RUN_PREFIX=s3torture-$$       # every object of this run is under it
if [ -n "${S3_BUCKET:-}" ]; then
    BUCKET=$S3_BUCKET
else
    BUCKET=s3torture-$(date +%Y%m%d%H%M%S)-$$
    $AWS "${ENDPOINT_ARGS[@]}" s3api create-bucket --bucket "$BUCKET" \
        >/dev/null || die "could not create bucket $BUCKET at $S3_ENDPOINT"
    CREATED_BUCKET=1
    echo "CreateBucket ok" >"$WORK/results.setup"
fi

for size in "${SIZE_LIST[@]}"; do
    head -c "$size" /dev/urandom >"$WORK/data.$size"
done

has_op() { [[ ",$OPS," == *",$1,"* ]]; }

# aws OPNAME args...: one S3 operation through the CLI, its result recorded.
aws_op() {
    local op=$1; shift
    if $AWS "${ENDPOINT_ARGS[@]}" --cli-connect-timeout 10 \
            --cli-read-timeout 60 s3api "$@" >"$RESULT_OUT" 2>"$RESULT_ERR"; then
        echo "$op ok" >>"$RESULTS"
    else
        echo "$op failed" >>"$RESULTS"
        sed "s/^/  $op: /" "$RESULT_ERR" | head -3 >&2
        return 1
    fi
}

# A PUT of a file; 8 MiB parts as a multipart upload from 8 MiB up.
put_object() {
    local key=$1 file=$2 size=$3 part=8388608
    if [ "$size" -lt "$part" ]; then
        aws_op PutObject put-object --bucket "$BUCKET" --key "$key" \
            --body "$file"
        return
    fi
    aws_op CreateMultipartUpload create-multipart-upload --bucket "$BUCKET" \
        --key "$key" --query UploadId --output text || return 1
    local upload n=1 offset=0 parts=""
    upload=$(cat "$RESULT_OUT")
    while [ "$offset" -lt "$size" ]; do
        tail -c +$((offset + 1)) "$file" | head -c "$part" >"$WORKER_DIR/part"
        aws_op UploadPart upload-part --bucket "$BUCKET" --key "$key" \
            --upload-id "$upload" --part-number "$n" \
            --body "$WORKER_DIR/part" --query ETag --output text || return 1
        parts+="${parts:+,}{\"PartNumber\":$n,\"ETag\":\"$(tr -d '"' <"$RESULT_OUT")\"}"
        n=$((n + 1)) offset=$((offset + part))
    done
    aws_op CompleteMultipartUpload complete-multipart-upload --bucket "$BUCKET" \
        --key "$key" --upload-id "$upload" \
        --multipart-upload "{\"Parts\":[$parts]}"
}

round() {
    local worker=$1 i=$2 prefix="$RUN_PREFIX/w$1/r$2" size keys=()
    for size in "${SIZE_LIST[@]}"; do
        local key="$prefix/obj-$size" file="$WORK/data.$size"
        keys+=("$key")
        if has_op put; then put_object "$key" "$file" "$size" || true; fi
        if has_op get; then
            aws_op GetObject get-object --bucket "$BUCKET" --key "$key" \
                "$WORKER_DIR/got" || true
        fi
        if has_op head; then
            aws_op HeadObject head-object --bucket "$BUCKET" --key "$key" || true
        fi
    done
    if has_op list; then
        # Two keys a page: a ListObjectsV2 per page, with continuation tokens.
        local token="" page
        for ((page = 0; page < 100; page++)); do
            aws_op ListObjectsV2 list-objects-v2 --bucket "$BUCKET" \
                --prefix "$prefix/" --page-size 2 --max-items 2 \
                ${token:+--starting-token "$token"} \
                --query NextToken --output json || break
            token=$(tr -d '"\n' <"$RESULT_OUT")
            [ -n "$token" ] && [ "$token" != null ] || break
        done
    fi
    if has_op copy; then
        aws_op CopyObject copy-object --bucket "$BUCKET" \
            --key "$prefix/copy" --copy-source "$BUCKET/${keys[0]}" || true
        keys+=("$prefix/copy")
    fi
    if has_op tagging; then
        aws_op PutObjectTagging put-object-tagging --bucket "$BUCKET" \
            --key "${keys[0]}" \
            --tagging 'TagSet=[{Key=torture,Value=yes}]' || true
        aws_op GetObjectTagging get-object-tagging --bucket "$BUCKET" \
            --key "${keys[0]}" || true
    fi
    if has_op presign; then
        local url
        if url=$($AWS "${ENDPOINT_ARGS[@]}" s3 presign \
                "s3://$BUCKET/${keys[0]}" --expires-in 300 2>"$RESULT_ERR") &&
                curl -sSf "${CURL_ARGS[@]}" -o /dev/null "$url" 2>"$RESULT_ERR"; then
            echo "GetObject ok" >>"$RESULTS"
        else
            echo "GetObject failed" >>"$RESULTS"
            sed 's/^/  presigned GET: /' "$RESULT_ERR" | head -3 >&2
        fi
    fi
    if has_op missing; then
        # A key that does not exist: 404 NoSuchKey is the expected answer.
        if $AWS "${ENDPOINT_ARGS[@]}" s3api get-object --bucket "$BUCKET" \
                --key "$prefix/missing" "$WORKER_DIR/got" >/dev/null \
                2>"$RESULT_ERR"; then
            echo "GetObject(404-expected) failed" >>"$RESULTS"
            echo "  GET of a missing key succeeded" >&2
        elif grep -q "NoSuchKey\|404" "$RESULT_ERR"; then
            echo "GetObject(404-expected) ok" >>"$RESULTS"
        else
            echo "GetObject(404-expected) failed" >>"$RESULTS"
            sed 's/^/  missing key: /' "$RESULT_ERR" | head -3 >&2
        fi
    fi
    if has_op delete; then
        aws_op DeleteObject delete-object --bucket "$BUCKET" \
            --key "${keys[0]}" || true
        if [ ${#keys[@]} -gt 1 ]; then
            local objects="" key
            for key in "${keys[@]:1}"; do
                objects+="${objects:+,}{Key=$key}"
            done
            aws_op DeleteObjects delete-objects --bucket "$BUCKET" \
                --delete "Objects=[$objects],Quiet=true" || true
        fi
    fi
}

worker() {
    local worker=$1 i
    WORKER_DIR=$WORK/w$worker
    mkdir -p "$WORKER_DIR"
    RESULTS=$WORK/results.$worker
    RESULT_OUT=$WORKER_DIR/out RESULT_ERR=$WORKER_DIR/err
    : >"$RESULTS"
    for ((i = 1; i <= ITERATIONS; i++)); do
        [ $(($(date +%s) - STARTED)) -lt "$DURATION" ] || break
        round "$worker" "$i"
    done
}

note "endpoint $S3_ENDPOINT, bucket $BUCKET, prefix $RUN_PREFIX/," \
    "$CONCURRENCY worker(s) x $ITERATIONS round(s), sizes $SIZES"
pids=()
for ((w = 1; w <= CONCURRENCY; w++)); do
    worker "$w" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done

elapsed=$(($(date +%s) - STARTED))
echo "s3_torture_aws.sh: summary: endpoint $S3_ENDPOINT bucket $BUCKET ${elapsed}s"
printf '%-26s %8s %8s\n' OPERATION OK FAILED
cat "$WORK"/results.* | awk '
    { if ($2 == "ok") ok[$1]++; else { failed[$1]++; bad++ }; seen[$1] = 1 }
    END {
        for (op in seen) printf "%-26s %8d %8d\n", op, ok[op], failed[op] | "sort"
        close("sort")
        exit bad > 0
    }' || { note "some operations failed"; exit 1; }
