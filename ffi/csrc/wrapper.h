/* Input of bindgen (build.rs) and header of the C shim (shim.c).
 *
 * DPDK's fast path (rx/tx burst, mbuf alloc/free, mtod, rte_errno, rte_lcore_id) is made of
 * static-inline functions and macros that have no symbol in libdpdk: shim.c wraps each of them in
 * a real function named dpdk_sys_*. Everything else is bound directly from the DPDK headers. */
#ifndef DPDK_SYS_WRAPPER_H
#define DPDK_SYS_WRAPPER_H

#include <stdint.h>

#include <rte_config.h>
#include <rte_version.h>
#include <rte_errno.h>
#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_dev.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_ethdev.h>

/* Bursts (rte_eth_rx_burst / rte_eth_tx_burst / rte_eth_tx_prepare). */
uint16_t dpdk_sys_rx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts,
			   uint16_t nb_pkts);
uint16_t dpdk_sys_tx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
			   uint16_t nb_pkts);
uint16_t dpdk_sys_tx_prepare(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
			     uint16_t nb_pkts);

/* Mbufs. */
struct rte_mbuf *dpdk_sys_pktmbuf_alloc(struct rte_mempool *mp);
int dpdk_sys_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned int count);
void dpdk_sys_pktmbuf_free(struct rte_mbuf *m);
void *dpdk_sys_pktmbuf_mtod(struct rte_mbuf *m);
uint16_t dpdk_sys_pktmbuf_data_len(const struct rte_mbuf *m);
void dpdk_sys_pktmbuf_set_data_len(struct rte_mbuf *m, uint16_t len);
uint32_t dpdk_sys_pktmbuf_pkt_len(const struct rte_mbuf *m);
void dpdk_sys_pktmbuf_set_pkt_len(struct rte_mbuf *m, uint32_t len);
uint16_t dpdk_sys_pktmbuf_nb_segs(const struct rte_mbuf *m);
uint16_t dpdk_sys_pktmbuf_tailroom(const struct rte_mbuf *m);
/* rte_pktmbuf_append: grows data_len/pkt_len by len, NULL when the tailroom is too small. */
char *dpdk_sys_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
uint64_t dpdk_sys_pktmbuf_ol_flags(const struct rte_mbuf *m);
/* Sets ol_flags, l2_len and l3_len for TX checksum offload (then call dpdk_sys_tx_prepare). */
void dpdk_sys_pktmbuf_set_tx_offload(struct rte_mbuf *m, uint64_t ol_flags, uint16_t l2_len,
				     uint16_t l3_len);

/* Per-lcore state. */
int dpdk_sys_errno(void);
unsigned int dpdk_sys_lcore_id(void);
unsigned int dpdk_sys_socket_id(void);

/* Values defined with RTE_BIT64() (a function-like macro that bindgen cannot evaluate),
 * re-exported as enumerators so that their values come from the headers, not from us. */
enum dpdk_sys_eth_rx_offload {
	DPDK_SYS_RX_OFFLOAD_IPV4_CKSUM = RTE_ETH_RX_OFFLOAD_IPV4_CKSUM,
	DPDK_SYS_RX_OFFLOAD_UDP_CKSUM = RTE_ETH_RX_OFFLOAD_UDP_CKSUM,
	DPDK_SYS_RX_OFFLOAD_TCP_CKSUM = RTE_ETH_RX_OFFLOAD_TCP_CKSUM,
	DPDK_SYS_RX_OFFLOAD_SCATTER = RTE_ETH_RX_OFFLOAD_SCATTER,
	DPDK_SYS_RX_OFFLOAD_RSS_HASH = RTE_ETH_RX_OFFLOAD_RSS_HASH,
};
enum dpdk_sys_eth_tx_offload {
	DPDK_SYS_TX_OFFLOAD_IPV4_CKSUM = RTE_ETH_TX_OFFLOAD_IPV4_CKSUM,
	DPDK_SYS_TX_OFFLOAD_UDP_CKSUM = RTE_ETH_TX_OFFLOAD_UDP_CKSUM,
	DPDK_SYS_TX_OFFLOAD_TCP_CKSUM = RTE_ETH_TX_OFFLOAD_TCP_CKSUM,
	DPDK_SYS_TX_OFFLOAD_TCP_TSO = RTE_ETH_TX_OFFLOAD_TCP_TSO,
	DPDK_SYS_TX_OFFLOAD_MULTI_SEGS = RTE_ETH_TX_OFFLOAD_MULTI_SEGS,
	DPDK_SYS_TX_OFFLOAD_MBUF_FAST_FREE = RTE_ETH_TX_OFFLOAD_MBUF_FAST_FREE,
};
enum dpdk_sys_eth_rss {
	DPDK_SYS_RSS_IP = RTE_ETH_RSS_IP,
	DPDK_SYS_RSS_TCP = RTE_ETH_RSS_TCP,
	DPDK_SYS_RSS_UDP = RTE_ETH_RSS_UDP,
};

#endif
