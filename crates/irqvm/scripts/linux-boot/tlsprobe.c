/* tlsprobe: a fresh process's TLS as static glibc builds it (brk block, image copied, ARCH_SET_FS), read
 * through FS, through DS and through /proc/self/mem (the kernel's own page walk); no libc. A mismatch prints
 * all three with ARCH_GET_FS and the CPUs, telling a wrong FS base from a stale mapping from a lost write.
 * "tlsprobe loop N" execs itself N times. As PID 1 (linux-boot.sh --tls-probe) it runs two such loops at
 * once, two loops of /bin/tlsglibc, 40 pairs of concurrent busybox execs, then execs /init. */
typedef unsigned long u64;
static long sys(long n, long a, long b, long c, long d)
{
	long r;
	register long r10 asm("r10") = d;
	asm volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
	return r;
}
static void out(const char *s) { long n = 0; while (s[n]) n++; sys(1, 1, (long)s, n, 0); }
static void hex(const char *name, u64 v)
{
	char b[40]; int i = 0;
	out(name); out("=0x");
	for (int s = 60; s >= 0; s -= 4) b[i++] = "0123456789abcdef"[(v >> s) & 15];
	b[i++] = ' '; b[i] = 0; out(b);
}
static u64 fsload(long off) { u64 v; asm volatile("movq %%fs:(%1),%0" : "=r"(v) : "r"(off) : "memory"); return v; }
static unsigned cpu(void) { unsigned c = 99; sys(309, (long)&c, 0, 0, 0); return c; }

static int child(void)
{
	unsigned c0 = cpu();
	u64 cur = sys(12, 0, 0, 0, 0);
	u64 end = sys(12, cur + 0x3000, 0, 0, 0);
	if (end < cur + 0x3000) { out("tlsprobe: brk failed\n"); return 3; }
	u64 tp = (cur + 0x1100 + 63) & ~63ul;
	u64 img[128];
	for (int i = 0; i < 128; i++)
		img[i] = 0xabcd000000000000ul | ((tp - 0x400 + 8 * i) & 0xffffffffffful);
	if (c0 & 1) {
		for (u64 a = tp - 0x400; a < tp; a += 8)
			*(volatile u64 *)a = 0xabcd000000000000ul | (a & 0xffffffffffful);
	} else {
		void *d = (void *)(tp - 0x400), *s = img; u64 n = sizeof(img);
		asm volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	}
	*(volatile u64 *)tp = tp;
	sys(158, 0x1002, tp, 0, 0); /* ARCH_SET_FS */
	unsigned c1 = cpu();
	u64 want = 0xabcd000000000000ul | ((tp - 0x90) & 0xffffffffffful);
	u64 v = fsload(-0x90);
	if (v == want && fsload(0) == tp)
		return 0;
	u64 ds = *(volatile u64 *)(tp - 0x90), fs0 = fsload(0), getfs = 0, mem = 0;
	sys(158, 0x1003, (long)&getfs, 0, 0); /* ARCH_GET_FS */
	long fd = sys(2, (long)"/proc/self/mem", 0, 0, 0);
	long got = sys(17, fd, (long)&mem, 8, tp - 0x90);
	out("tlsprobe: BAD ");
	hex("tp", tp); hex("fs:-0x90", v); hex("want", want); hex("ds", ds); hex("fs:0", fs0);
	hex("arch_get_fs", getfs); hex("procmem", mem); hex("pread", got); hex("brk0", cur);
	hex("cpu_start", c0); hex("cpu_setfs", c1); hex("cpu_now", cpu()); hex("again_fs", fsload(-0x90));
	out("\n");
	return 2;
}

static int loop(long n, char **argv, char **envp)
{
	long bad = 0, sig = 0;
	char *cargv[] = { argv[0], "child", 0 };
	for (long i = 0; i < n; i++) {
		long pid = sys(57, 0, 0, 0, 0);
		if (pid == 0) { sys(59, (long)cargv[0], (long)cargv, (long)envp, 0); sys(60, 9, 0, 0, 0); }
		int st = 0;
		sys(61, pid, (long)&st, 0, 0);
		if ((st & 0x7f) != 0) sig++;
		else if (((st >> 8) & 0xff) != 0) bad++;
	}
	out("tlsprobe: "); hex("execs", n); hex("bad", bad); hex("signalled", sig); out("\n");
	return bad || sig;
}

static long num(const char *s) { long v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + *s++ - '0'; return v; }

int main(int argc, char **argv, char **envp)
{
	if (argc > 2 && argv[1][0] == 'l') return loop(num(argv[2]), argv, envp);
	if (sys(39, 0, 0, 0, 0) == 1) {
		/* PID 1: probe first, then the glibc probe, then the real /init. */
		char *me[] = { "/bin/tlsprobe", 0 };
		sys(165, (long)"proc", (long)"/proc", (long)"proc", 0);
		/* Two loops at once, one per CPU's worth, as a shell pipeline would. */
		long p1 = sys(57, 0, 0, 0, 0);
		if (p1 == 0) { loop(100, me, envp); sys(60, 0, 0, 0, 0); }
		loop(100, me, envp);
		int st = 0;
		sys(61, p1, (long)&st, 0, 0);
		char *g[] = { "/bin/tlsglibc", "l", "60", 0 };
		long pa = sys(57, 0, 0, 0, 0);
		if (pa == 0) { sys(59, (long)g[0], (long)g, (long)envp, 0); sys(60, 9, 0, 0, 0); }
		long pb = sys(57, 0, 0, 0, 0);
		if (pb == 0) { sys(59, (long)g[0], (long)g, (long)envp, 0); sys(60, 9, 0, 0, 0); }
		sys(61, pa, (long)&st, 0, 0);
		sys(61, pb, (long)&st, 0, 0);
		char *b[] = { "/bin/busybox", "sh", "-c", "i=0; n=0; while [ $i -lt 40 ]; do /bin/busybox true & /bin/busybox true || n=$((n+1)); wait; i=$((i+1)); done; echo busybox pairs failed $n", 0 };
		long pc = sys(57, 0, 0, 0, 0);
		if (pc == 0) { sys(59, (long)b[0], (long)b, (long)envp, 0); sys(60, 9, 0, 0, 0); }
		sys(61, pc, (long)&st, 0, 0);
		out("tlsprobe: glibc probe ended\n");
		char *in[] = { "/init", 0 };
		sys(59, (long)"/init", (long)in, (long)envp, 0);
		return 1;
	}
	return child();
}
asm(".globl _start\n_start:\n xor %rbp,%rbp\n mov (%rsp),%rdi\n lea 8(%rsp),%rsi\n lea 16(%rsp,%rdi,8),%rdx\n"
    " and $-16,%rsp\n call main\n mov %eax,%edi\n mov $60,%eax\n syscall\n");
