/*
 * tbprof: a QEMU TCG plugin (plugin API version 1, QEMU 7.x) that counts how often each
 * translation block runs and writes "vaddr insns count" lines (hex, decimal, decimal) at exit,
 * to the file given as `out=PATH` (default tbprof.txt). With `-icount shift=0` the counts are
 * exact instruction counts of the guest and of Moat. See README.md.
 *
 * Build: gcc -O2 -shared -fPIC -fvisibility=hidden -o target/tbprof.so tools/tbprof/tbprof.c
 *
 * The few plugin API declarations used are written out here (QEMU's qemu-plugin.h is not
 * packaged by Debian); they follow the API version 1 signatures.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <stddef.h>
#include <pthread.h>
typedef uint64_t qemu_plugin_id_t;
#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = 1;
typedef struct { const char *target_name; struct { int min, cur; } version; bool system_emulation;
  union { struct { int smp_vcpus, max_vcpus; } system; }; } qemu_info_t;
struct qemu_plugin_tb;
typedef void (*tb_trans_cb)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*udata_cb)(qemu_plugin_id_t, void *);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, int op, void *ptr, uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, udata_cb, void *);

typedef struct Ent { uint64_t vaddr, n, count; struct Ent *next; } Ent;
#define NB (1 << 20)
static Ent *buckets[NB];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const char *out = "tbprof.txt";

static void trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  uint64_t va = qemu_plugin_tb_vaddr(tb), n = qemu_plugin_tb_n_insns(tb);
  size_t h = (va ^ (va >> 20) ^ (n << 7)) & (NB - 1);
  pthread_mutex_lock(&lock);
  Ent *e = buckets[h];
  while (e && !(e->vaddr == va && e->n == n)) e = e->next;
  if (!e) { e = calloc(1, sizeof *e); e->vaddr = va; e->n = n; e->next = buckets[h]; buckets[h] = e; }
  pthread_mutex_unlock(&lock);
  qemu_plugin_register_vcpu_tb_exec_inline(tb, 0, &e->count, 1);
}

static void done(qemu_plugin_id_t id, void *p) {
  FILE *f = fopen(out, "w");
  if (!f) return;
  for (size_t i = 0; i < NB; i++)
    for (Ent *e = buckets[i]; e; e = e->next)
      if (e->count) fprintf(f, "%lx %lu %lu\n", e->vaddr, e->n, e->count);
  fclose(f);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  for (int i = 0; i < argc; i++)
    if (argv[i][0] == 'o' && argv[i][1] == 'u' && argv[i][2] == 't' && argv[i][3] == '=') out = argv[i] + 4;
  qemu_plugin_register_vcpu_tb_trans_cb(id, trans);
  qemu_plugin_register_atexit_cb(id, done, NULL);
  return 0;
}
