include $(sort $(wildcard $(BR2_EXTERNAL_KUBE_VIP_PATH)/package/*/*.mk))
