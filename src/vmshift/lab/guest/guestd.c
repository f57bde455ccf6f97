/* vmshift-guestd: entry point, argument parsing and the status service (TCP 7002).
 *
 * Usage: vmshift-guestd [--memtest SIZE_MIB[,RATE_MIBPS[,THREADS]]] [--disklog DEVICE] [--disklog-rate N]
 *                       [--ready-file PATH]
 * The ready file is created once every port is bound and the disk log has been scanned.
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

static void usage_exit(const char *msg)
{
    logmsg("%s", msg);
    fprintf(stderr, "usage: vmshift-guestd [--memtest SIZE_MIB[,RATE_MIBPS[,THREADS]]] [--disklog DEVICE]"
                    " [--disklog-rate N] [--ready-file PATH]\n");
    exit(2);
}

/* Copies s into a JSON string literal (quotes included); status strings are short. */
static void json_str(char *out, size_t n, const char *s)
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

static int format_status(char *out, size_t n)
{
    char mt_err[160] = "null", dl_err[160] = "null", dev[80];
    if (mt.error[0])
        json_str(mt_err, sizeof mt_err, mt.error);
    if (dl.error[0])
        json_str(dl_err, sizeof dl_err, dl.error);
    json_str(dev, sizeof dev, dl.device);
    return snprintf(
        out, n,
        "{\"uptime_s\":%.1f,"
        "\"memtest\":{\"enabled\":%s,\"size_mib\":%u,\"rate_mibps\":%u,\"threads\":%u,\"pages\":%llu,\"passes\":%llu,"
        "\"mismatches\":%llu,\"error\":%s},"
        "\"disklog\":{\"enabled\":%s,\"device\":%s,\"durable_seq\":%llu,\"first_seq\":%llu,"
        "\"records_verified_at_boot\":%llu,\"corrupt_at_boot\":%llu,\"errors\":%llu,\"error\":%s},"
        "\"echo\":{\"tcp_active\":%llu,\"tcp_total\":%llu,\"udp_packets\":%llu}}\n",
        clock_s(CLOCK_BOOTTIME), mt.enabled ? "true" : "false", mt.size_mib, mt.rate_mibps, mt.threads,
        (unsigned long long)atomic_load(&mt.pages), (unsigned long long)atomic_load(&mt.passes),
        (unsigned long long)atomic_load(&mt.mismatches), mt_err, dl.enabled ? "true" : "false",
        dl.enabled ? dev : "null", (unsigned long long)atomic_load(&dl.durable_seq),
        (unsigned long long)atomic_load(&dl.first_seq), (unsigned long long)atomic_load(&dl.verified_at_boot),
        (unsigned long long)atomic_load(&dl.corrupt_at_boot), (unsigned long long)atomic_load(&dl.errors),
        dl_err, (unsigned long long)atomic_load(&ec.tcp_active), (unsigned long long)atomic_load(&ec.tcp_total),
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
        } else if (!strcmp(a, "--ready-file") && v) {
            *ready_file = v;
        } else {
            usage_exit("unknown or incomplete option");
        }
        i++;
    }
}

int main(int argc, char **argv)
{
    const char *ready_file = NULL;
    parse_args(argc, argv, &ready_file);
    signal(SIGPIPE, SIG_IGN);

    int tcp = listen_tcp(ECHO_TCP_PORT), udp = bind_udp(ECHO_UDP_PORT), status = listen_tcp(STATUS_TCP_PORT);
    if (tcp < 0 || udp < 0 || status < 0) {
        logmsg("cannot bind ports %d/%d/%d: %s", ECHO_TCP_PORT, ECHO_UDP_PORT, STATUS_TCP_PORT, strerror(errno));
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

    if (ready_file) {
        int fd = open(ready_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd >= 0)
            close(fd);
    }
    logmsg("serving echo tcp/%d udp/%d, status tcp/%d", ECHO_TCP_PORT, ECHO_UDP_PORT, STATUS_TCP_PORT);

    char line[1024];
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
