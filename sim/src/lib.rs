//! Simulated inference engine speaking vLLM's, SGLang's and TensorRT-LLM's wire formats. Not built yet: this crate is a compiling placeholder until its issue lands.
