"""How the policy is trained: precision (fp32 master weights), LoRA adapters, the memory plan."""
