#!/bin/sh
# run-matrix.sh [GUEST...]: runs each guest (default: all) under QEMU with -smp 1, 2, 4 and -accel tcg, kvm,
# one run at a time, and prints one line per run: GUEST SMP ACCEL RESULT passed/failed [failed check names].
# Full outputs go to $LOGDIR (default build/matrix/).
here=$(cd "$(dirname "$0")" && pwd)
guests=${*:-$(sed -n 's/^GUESTS := //p' "$here/Makefile")}
logdir=${LOGDIR:-$here/build/matrix}
mkdir -p "$logdir"
make -s -C "$here" OUT="${OUT:-$here/build}" || exit 2
for g in $guests; do
	for accel in ${ACCELS:-tcg kvm}; do
		for smp in ${SMPS:-1 2 4}; do
			log=$logdir/$g-$smp-$accel.log
			"$here/run-qemu.sh" "$g" "$smp" "$accel" >"$log" 2>&1
			case $? in 0) r=ok ;; 1) r=FAILED ;; *) r=ERROR ;; esac
			done_line=$(sed -n 's/^DONE: //p' "$log")
			fails=$(sed -n 's/^FAIL: \([^:]*\):.*/\1/p' "$log" | tr '\n' ';')
			echo "$g smp=$smp $accel $r ${done_line:-no DONE line} ${fails:+[$fails]}"
		done
	done
done
