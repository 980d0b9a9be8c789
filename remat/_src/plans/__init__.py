"""Plans as data and the search that chooses among them: segment trees and their cost model, the
segmenters, and the verified search.
"""
