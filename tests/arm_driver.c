/* Runs one TVM kernel (.so exported for ARM) under qemu-user, without a TVM runtime.
 * usage: driver kernel.so-linked-in  in.bin  out.bin
 * in.bin: int32 count, then per array: uint8 dtype code, uint8 bits, int32 ndim, int64 shape[ndim], raw data.
 * The last array is the output; its bytes after the call are written to out.bin. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <tvm/ffi/c_api.h>

int __tvm_ffi_main(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

/* The kernel reaches the TVM runtime through these pointers, which a TVM module loader fills in. */
typedef struct { void* sync_handle; int32_t num_task; } ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv* env, void* cdata);
/* weak: a kernel without parallel loops or workspaces does not define them */
extern void* __TVMBackendParallelLaunch __attribute__((weak));
extern void* __TVMBackendAllocWorkspace __attribute__((weak));
extern void* __TVMBackendFreeWorkspace __attribute__((weak));

static int parallel_launch(ParallelLambda body, void* cdata, int num_task) {
  ParallelEnv env = {NULL, 1};   /* serial: one task does all the work */
  return body(0, &env, cdata);
}
static void* alloc_workspace(int type, int id, uint64_t bytes, int code, int bits) {
  return aligned_alloc(64, (bytes + 63) / 64 * 64);
}
static int free_workspace(int type, int id, void* ptr) {
  free(ptr);
  return 0;
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "%s:", kind);
  for (int i = 0; i < n; ++i) fprintf(stderr, " %s", parts[i]);
  fprintf(stderr, "\n");
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  if (&__TVMBackendParallelLaunch) __TVMBackendParallelLaunch = (void*)parallel_launch;
  if (&__TVMBackendAllocWorkspace) __TVMBackendAllocWorkspace = (void*)alloc_workspace;
  if (&__TVMBackendFreeWorkspace) __TVMBackendFreeWorkspace = (void*)free_workspace;
  FILE* in = fopen(argv[1], "rb");
  int32_t count;
  if (!in || fread(&count, 4, 1, in) != 1) return 3;
  DLTensor* tensors = calloc(count, sizeof(DLTensor));
  TVMFFIAny* args = calloc(count, sizeof(TVMFFIAny));
  size_t out_bytes = 0;
  for (int i = 0; i < count; ++i) {
    uint8_t code, bits;
    int32_t ndim;
    if (fread(&code, 1, 1, in) != 1 || fread(&bits, 1, 1, in) != 1 || fread(&ndim, 4, 1, in) != 1) return 4;
    int64_t* shape = malloc(sizeof(int64_t) * ndim);
    if (fread(shape, 8, ndim, in) != (size_t)ndim) return 5;
    size_t bytes = bits / 8;
    for (int d = 0; d < ndim; ++d) bytes *= shape[d];
    void* data = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (fread(data, 1, bytes, in) != bytes) return 6;
    tensors[i] = (DLTensor){data, {kDLCPU, 0}, ndim, {code, bits, 1}, shape, NULL, 0};
    args[i].type_index = kTVMFFIDLTensorPtr;
    args[i].v_ptr = &tensors[i];
    out_bytes = bytes;
  }
  TVMFFIAny result = {0};
  int status = __tvm_ffi_main(NULL, args, count, &result);
  FILE* out = fopen(argv[2], "wb");
  fwrite(tensors[count - 1].data, 1, out_bytes, out);
  fclose(out);
  return status;
}
