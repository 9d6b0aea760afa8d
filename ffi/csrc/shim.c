/* Real-symbol wrappers for DPDK's static-inline fast path; see wrapper.h. */
#include "wrapper.h"

uint16_t dpdk_sys_rx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts,
			   uint16_t nb_pkts)
{
	return rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
}

uint16_t dpdk_sys_tx_burst(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
			   uint16_t nb_pkts)
{
	return rte_eth_tx_burst(port_id, queue_id, tx_pkts, nb_pkts);
}

uint16_t dpdk_sys_tx_prepare(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
			     uint16_t nb_pkts)
{
	return rte_eth_tx_prepare(port_id, queue_id, tx_pkts, nb_pkts);
}

struct rte_mbuf *dpdk_sys_pktmbuf_alloc(struct rte_mempool *mp)
{
	return rte_pktmbuf_alloc(mp);
}

int dpdk_sys_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned int count)
{
	return rte_pktmbuf_alloc_bulk(mp, mbufs, count);
}

void dpdk_sys_pktmbuf_free(struct rte_mbuf *m)
{
	rte_pktmbuf_free(m);
}

void *dpdk_sys_pktmbuf_mtod(struct rte_mbuf *m)
{
	return rte_pktmbuf_mtod(m, void *);
}

uint16_t dpdk_sys_pktmbuf_data_len(const struct rte_mbuf *m)
{
	return rte_pktmbuf_data_len(m);
}

void dpdk_sys_pktmbuf_set_data_len(struct rte_mbuf *m, uint16_t len)
{
	m->data_len = len;
}

uint32_t dpdk_sys_pktmbuf_pkt_len(const struct rte_mbuf *m)
{
	return rte_pktmbuf_pkt_len(m);
}

void dpdk_sys_pktmbuf_set_pkt_len(struct rte_mbuf *m, uint32_t len)
{
	m->pkt_len = len;
}

uint16_t dpdk_sys_pktmbuf_nb_segs(const struct rte_mbuf *m)
{
	return m->nb_segs;
}

uint16_t dpdk_sys_pktmbuf_tailroom(const struct rte_mbuf *m)
{
	return rte_pktmbuf_tailroom(m);
}

char *dpdk_sys_pktmbuf_append(struct rte_mbuf *m, uint16_t len)
{
	return rte_pktmbuf_append(m, len);
}

uint64_t dpdk_sys_pktmbuf_ol_flags(const struct rte_mbuf *m)
{
	return m->ol_flags;
}

void dpdk_sys_pktmbuf_set_tx_offload(struct rte_mbuf *m, uint64_t ol_flags, uint16_t l2_len,
				     uint16_t l3_len)
{
	m->ol_flags = ol_flags;
	m->l2_len = l2_len;
	m->l3_len = l3_len;
}

int dpdk_sys_errno(void)
{
	return rte_errno;
}

unsigned int dpdk_sys_lcore_id(void)
{
	return rte_lcore_id();
}

unsigned int dpdk_sys_socket_id(void)
{
	return rte_socket_id();
}
