/* vmshift-guestd: entry point, argument parsing and the status service (TCP 7002).
 *
 * Usage: vmshift-guestd [--memtest SIZE_MIB[,RATE_MIBPS[,THREADS]]] [--disklog DEVICE] [--disklog-rate N]
 *                       [--diskwrite RATE_MIBPS[,DEVICE]] [--ready-file PATH]
 * The ready file is created once every port is bound and the disk log has been scanned (the disk
 * writer scans its device in its own thread and starts writing after that).
 * TCP 7003 verifies on connect: it re-reads the disk log's ring and the disk writer's device and
 * writes one JSON line with what it found (the writer pauses meanwhile, the log does not).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "guestd.h"

static struct memtest_stats mt;
static struct disklog_stats dl;
static struct echo_stats ec;
static struct diskwrite_stats dw;

#define USAGE                                                                                             \
    "usage: vmshift-guestd [--memtest SIZE_MIB[,RATE_MIBPS[,THREADS]]] [--disklog DEVICE] [--disklog-rate N]" \
    " [--diskwrite RATE_MIBPS[,DEVICE]] [--ready-file PATH]\n"

static void usage_exit(const char *msg)
{
    logmsg("%s", msg);
    fputs(USAGE, stderr);
    exit(2);
}

/* Copies s into a JSON string literal (quotes included); status strings are short. */
void json_str(char *out, size_t n, const char *s)
{
    size_t o = 0;
    if (n < 3)
        return;
    out[o++] = '"';
    for (; *s && o + 3 < n; s++)
        if (*s == '"' || *s == '\\' || (unsigned char)*s < 0x20) {
            out[o++] = ' ';
        } else {
            out[o++] = *s;
        }
    out[o++] = '"';
    out[o] = 0;
}

int ring_verify_json(char *out, size_t n, const struct ring_verify *v)
{
    char err[160] = "null";
    if (v->error[0])
        json_str(err, sizeof err, v->error);
    return snprintf(out, n,
                    "{\"from_seq\":%llu,\"to_seq\":%llu,\"checked\":%llu,\"missing\":%llu,\"corrupt\":%llu,"
                    "\"bad\":%llu,\"torn\":%llu,\"ms\":%.1f,\"error\":%s}",
                    v->from_seq, v->to_seq, v->checked, v->missing, v->corrupt, v->missing + v->corrupt, v->torn,
                    v->ms, err);
}

/* "diskwrite":{...}: the writer's counters, its rate over the last second and its boot scan. */
static int format_diskwrite(char *out, size_t n)
{
    char err[160] = "null", dev[80], boot[400] = "null";
    if (!dw.enabled)
        return snprintf(out, n, "{\"enabled\":false}");
    if (dw.error[0])
        json_str(err, sizeof err, dw.error);
    json_str(dev, sizeof dev, dw.device);
    int scanned = atomic_load(&dw.scanned);
    if (scanned && dw.nslots >= 1)
        ring_verify_json(boot, sizeof boot, &dw.boot);
    return snprintf(out, n,
                    "{\"enabled\":true,\"device\":%s,\"rate_mibps\":%u,\"chunk_kib\":%u,\"chunks\":%llu,"
                    "\"scanned\":%s,\"durable_seq\":%llu,\"first_seq\":%llu,\"bytes_written\":%llu,"
                    "\"mibps\":%.2f,\"errors\":%llu,\"error\":%s,\"boot_scan\":%s}",
                    dev, dw.rate_mibps, dw.chunk_kib, dw.nslots, scanned ? "true" : "false",
                    (unsigned long long)atomic_load(&dw.durable_seq), (unsigned long long)atomic_load(&dw.first_seq),
                    (unsigned long long)atomic_load(&dw.bytes_written), scanned ? diskwrite_mibps() : 0.0,
                    (unsigned long long)atomic_load(&dw.errors), err, boot);
}

static int format_status(char *out, size_t n)
{
    char mt_err[160] = "null", dl_err[160] = "null", dev[80], lat[256] = "null", dwj[1024];
    if (mt.error[0])
        json_str(mt_err, sizeof mt_err, mt.error);
    if (dl.error[0])
        json_str(dl_err, sizeof dl_err, dl.error);
    json_str(dev, sizeof dev, dl.device);
    if (dl.enabled)
        disklog_latency_json(lat, sizeof lat);
    format_diskwrite(dwj, sizeof dwj);
    return snprintf(
        out, n,
        "{\"uptime_s\":%.1f,"
        "\"memtest\":{\"enabled\":%s,\"size_mib\":%u,\"rate_mibps\":%u,\"threads\":%u,\"pages\":%llu,\"passes\":%llu,"
        "\"mismatches\":%llu,\"error\":%s},"
        "\"disklog\":{\"enabled\":%s,\"device\":%s,\"durable_seq\":%llu,\"first_seq\":%llu,"
        "\"records_verified_at_boot\":%llu,\"corrupt_at_boot\":%llu,\"errors\":%llu,\"error\":%s,"
        "\"latency\":%s},"
        "\"diskwrite\":%s,"
        "\"echo\":{\"tcp_active\":%llu,\"tcp_total\":%llu,\"udp_packets\":%llu}}\n",
        clock_s(CLOCK_BOOTTIME), mt.enabled ? "true" : "false", mt.size_mib, mt.rate_mibps, mt.threads,
        (unsigned long long)atomic_load(&mt.pages), (unsigned long long)atomic_load(&mt.passes),
        (unsigned long long)atomic_load(&mt.mismatches), mt_err, dl.enabled ? "true" : "false",
        dl.enabled ? dev : "null", (unsigned long long)atomic_load(&dl.durable_seq),
        (unsigned long long)atomic_load(&dl.first_seq), (unsigned long long)atomic_load(&dl.verified_at_boot),
        (unsigned long long)atomic_load(&dl.corrupt_at_boot), (unsigned long long)atomic_load(&dl.errors),
        dl_err, lat, dwj, (unsigned long long)atomic_load(&ec.tcp_active), (unsigned long long)atomic_load(&ec.tcp_total),
        (unsigned long long)atomic_load(&ec.udp_packets));
}

static void parse_args(int argc, char **argv, const char **ready_file)
{
    dl.rate_per_s = 20;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--memtest") && v) {
            mt.threads = 1;
            if (sscanf(v, "%u,%u,%u", &mt.size_mib, &mt.rate_mibps, &mt.threads) < 1 || mt.size_mib == 0 ||
                mt.threads < 1 || mt.threads > MEMTEST_MAX_THREADS)
                usage_exit("--memtest wants SIZE_MIB[,RATE_MIBPS[,THREADS]] with SIZE_MIB > 0, THREADS 1..64");
            mt.enabled = 1;
        } else if (!strcmp(a, "--disklog") && v) {
            snprintf(dl.device, sizeof dl.device, "%s", v);
            dl.enabled = 1;
        } else if (!strcmp(a, "--disklog-rate") && v) {
            dl.rate_per_s = (unsigned)strtoul(v, NULL, 10);
        } else if (!strcmp(a, "--diskwrite") && v) {
            snprintf(dw.device, sizeof dw.device, "/dev/vdb");
            char dev[64] = "";
            if (sscanf(v, "%u,%63s", &dw.rate_mibps, dev) < 1)
                usage_exit("--diskwrite wants RATE_MIBPS[,DEVICE] (0 = flat out)");
            if (dev[0])
                snprintf(dw.device, sizeof dw.device, "%s", dev);
            dw.enabled = 1;
        } else if (!strcmp(a, "--ready-file") && v) {
            *ready_file = v;
        } else {
            usage_exit("unknown or incomplete option");
        }
        i++;
    }
}

/* TCP 7003: each connection runs one verify of both rings and gets one JSON line back. */
static void *verify_loop(void *arg)
{
    int srv = (int)(intptr_t)arg;
    static char line[1024], a[400], b[400];
    for (;;) {
        int c = accept4(srv, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno != EINTR && errno != ECONNABORTED)
                usleep(10000);
            continue;
        }
        struct ring_verify v;
        snprintf(a, sizeof a, "null");
        snprintf(b, sizeof b, "null");
        if (dl.enabled) {
            disklog_verify(&v);
            ring_verify_json(a, sizeof a, &v);
        }
        if (dw.enabled) {
            diskwrite_verify(&v);
            ring_verify_json(b, sizeof b, &v);
        }
        int n = snprintf(line, sizeof line, "{\"disklog\":%s,\"diskwrite\":%s}\n", a, b);
        if (n > 0)
            send(c, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1, MSG_NOSIGNAL);
        shutdown(c, SHUT_WR);
        close(c);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    const char *ready_file = NULL;
    parse_args(argc, argv, &ready_file);
    signal(SIGPIPE, SIG_IGN);

    int tcp = listen_tcp(ECHO_TCP_PORT), udp = bind_udp(ECHO_UDP_PORT), status = listen_tcp(STATUS_TCP_PORT);
    int verify = listen_tcp(VERIFY_TCP_PORT);
    if (tcp < 0 || udp < 0 || status < 0 || verify < 0) {
        logmsg("cannot bind ports %d/%d/%d/%d: %s", ECHO_TCP_PORT, ECHO_UDP_PORT, STATUS_TCP_PORT, VERIFY_TCP_PORT,
               strerror(errno));
        return 1;
    }
    if (echo_start(tcp, udp, &ec) < 0) {
        logmsg("cannot start echo threads");
        return 1;
    }
    if (dl.enabled && disklog_scan(&dl) == 0)
        disklog_start(&dl);
    if (mt.enabled && memtest_start(&mt) < 0)
        logmsg("memtest: %s", mt.error);
    if (dw.enabled && diskwrite_start(&dw, dl.enabled ? dl.device : NULL) < 0 && !dw.error[0])
        snprintf(dw.error, sizeof dw.error, "cannot start the disk writer thread");
    if (start_thread(verify_loop, (void *)(intptr_t)verify, 256 * 1024) < 0)
        logmsg("cannot start the verify thread");

    if (ready_file) {
        int fd = open(ready_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd >= 0)
            close(fd);
    }
    logmsg("serving echo tcp/%d udp/%d, status tcp/%d, verify tcp/%d", ECHO_TCP_PORT, ECHO_UDP_PORT,
           STATUS_TCP_PORT, VERIFY_TCP_PORT);

    static char line[4096];
    for (;;) {
        int c = accept4(status, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno != EINTR && errno != ECONNABORTED)
                usleep(10000);
            continue;
        }
        int n = format_status(line, sizeof line);
        if (n > 0)
            send(c, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1, MSG_NOSIGNAL);
        shutdown(c, SHUT_WR);
        close(c);
    }
}
