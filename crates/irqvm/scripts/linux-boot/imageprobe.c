/* imageprobe: a freshly exec'd process checks that its own image reads back as the file holds it: a
 * 64 KiB read-only pattern (.rodata, file-backed pages never written), a 64 KiB .data pattern and its
 * initialised TLS (glibc copies .tdata into the brk block at start-up). It is the check the busybox
 * processes that died at 0x4a4d02 failed (docs/benchmarks.md, "The FS-base fault"): their TLS block held
 * the shell's heap data where .tdata's image belonged. A mismatch prints the address, the value read in
 * user mode, the value the kernel reads through /proc/self/mem, and the page's frame from
 * /proc/self/pagemap, telling a wrong translation in user mode from wrong memory.
 *
 *   imageprobe check            the exec'd child (exit status 1 on a mismatch)
 *   imageprobe run SECONDS N    N unpinned loops for SECONDS: fork (the child dirties a heap of its own,
 *                               copy-on-write, then execs "check"), wait; prints the counts */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WORDS 8192 /* 64 KiB of each pattern */
#define RO_TAG 0x524f000000000000ul
#define DATA_TAG 0x4441000000000000ul
#define TLS_TAG 0x544c000000000000ul

asm(".section .rodata\n.balign 4096\n.globl ro_pattern\nro_pattern:\n.set i, 0\n.rept 8192\n"
    ".quad 0x524f000000000000 + i\n.set i, i + 1\n.endr\n.previous\n");
asm(".section .data\n.balign 4096\n.globl data_pattern\ndata_pattern:\n.set i, 0\n.rept 8192\n"
    ".quad 0x4441000000000000 + i\n.set i, i + 1\n.endr\n.previous\n");
extern const unsigned long ro_pattern[WORDS];
extern unsigned long data_pattern[WORDS];
static __thread unsigned long tls_pattern[5] = {TLS_TAG, TLS_TAG + 1, TLS_TAG + 2, TLS_TAG + 3, TLS_TAG + 4};

static unsigned long kernel_view(const volatile unsigned long *p)
{
	unsigned long v = 0xdeadul;
	int fd = open("/proc/self/mem", O_RDONLY);
	if (fd >= 0) {
		if (pread(fd, &v, sizeof(v), (off_t)(unsigned long)p) != sizeof(v))
			v = 0xdead1ul;
		close(fd);
	}
	return v;
}

static unsigned long pagemap(const volatile void *p)
{
	unsigned long e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd >= 0) {
		if (pread(fd, &e, sizeof(e), (off_t)((unsigned long)p / 4096 * 8)) != sizeof(e))
			e = 0;
		close(fd);
	}
	return e;
}

/* Compares WORDS words at p with tag + i; prints the first few mismatches. */
static int compare(const char *what, const volatile unsigned long *p, int words, unsigned long tag)
{
	int bad = 0;
	for (int i = 0; i < words; i++) {
		unsigned long v = p[i];
		if (v == tag + i)
			continue;
		if (bad < 4)
			printf("imageprobe: BAD %s[%d] at %p (cpu %d): user %#lx kernel %#lx want %#lx pagemap %#lx\n",
			       what, i, (void *)&p[i], sched_getcpu(), v, kernel_view(&p[i]), tag + i, pagemap(&p[i]));
		bad++;
	}
	return bad;
}

static int check(void)
{
	int bad = compare("tls", tls_pattern, 5, TLS_TAG);
	bad += compare("rodata", ro_pattern, WORDS, RO_TAG);
	bad += compare("data", data_pattern, WORDS, DATA_TAG);
	fflush(stdout);
	return bad != 0;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

#define HEAP_PAGES 32

static void loop(int id, double seconds)
{
	unsigned char *heap = malloc(HEAP_PAGES * 4096);
	for (int i = 0; i < HEAP_PAGES * 4096; i++)
		heap[i] = "shellhp!"[i & 7];
	long runs = 0, bad = 0, died = 0;
	double end = now() + seconds;
	while (now() < end) {
		fflush(stdout);
		pid_t p = fork();
		if (p == 0) {
			for (int i = 0; i < HEAP_PAGES * 4096; i += 4096)
				heap[i + 16] ^= 1;
			execl("/bin/imageprobe", "imageprobe", "check", (char *)NULL);
			_exit(9);
		}
		int st;
		waitpid(p, &st, 0);
		runs++;
		if (WIFSIGNALED(st)) {
			died++;
			printf("imageprobe: loop %d run %ld died with signal %d\n", id, runs, WTERMSIG(st));
		} else if (WEXITSTATUS(st)) {
			bad++;
		}
	}
	printf("imageprobe: loop %d runs=%ld bad=%ld died=%ld\n", id, runs, bad, died);
	fflush(stdout);
	_exit(bad + died > 0);
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "check"))
		return check();
	if (argc < 4 || strcmp(argv[1], "run")) {
		fprintf(stderr, "usage: imageprobe check | imageprobe run SECONDS LOOPS\n");
		return 2;
	}
	double seconds = atof(argv[2]);
	int loops = atoi(argv[3]);
	if (check())
		printf("imageprobe: the parent's own image is BAD\n");
	for (int i = 0; i < loops; i++)
		if (fork() == 0)
			loop(i, seconds);
	int failed = 0, st;
	while (wait(&st) > 0)
		failed += !WIFEXITED(st) || WEXITSTATUS(st);
	printf("imageprobe: DONE %d of %d loops saw a bad image or a death\n", failed, loops);
	return failed != 0;
}
