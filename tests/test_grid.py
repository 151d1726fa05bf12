

def test_cache_split_aligned():
    """[cache; fresh] keys split on a key-block boundary along t (the sm90_ws kernel's two segments)."""
    from longcat_kernels.grid import cache_split_aligned

    hw = 44 * 80
    assert cache_split_aligned(8 * hw, hw, 4) and cache_split_aligned(4 * hw, hw, 4)  # LongCat: 8 or 4 cond latents
    assert not cache_split_aligned(3 * hw, hw, 4) and not cache_split_aligned(6 * hw, hw, 4)
    assert cache_split_aligned(3 * hw, hw, 1) and cache_split_aligned(0, hw, 4)
